"""Data: webdataset shards with stable sample ids, manifests, demo datasets and batch streams.

Writers: :func:`write_image_text_shards`, :func:`make_token_shards`, :func:`make_chat_shards`,
:func:`make_demo_clip_dataset`, :func:`make_demo_text_dataset`. Readers: :func:`clip_batches` /
:func:`token_batches` (endless training streams per rank), :func:`eval_batches` (one ordered
pass), :func:`read_manifest`.
"""

from dist_tempnet.data.chat import make_chat_shards
from dist_tempnet.data.collate import CLIP_MEAN, CLIP_STD
from dist_tempnet.data.demo_clip import make_demo_clip_dataset
from dist_tempnet.data.demo_text import make_demo_text_dataset
from dist_tempnet.data.eval_pass import EvalBatches, eval_batches
from dist_tempnet.data.index import index_shards
from dist_tempnet.data.loaders import clip_batches, token_batches
from dist_tempnet.data.manifest import Manifest, ManifestError, ShardInfo, read_manifest, resolve_manifest
from dist_tempnet.data.pairs import make_pair_shards
from dist_tempnet.data.reader import CorruptShardError
from dist_tempnet.data.shards import write_image_text_shards
from dist_tempnet.data.streams import BatchStream
from dist_tempnet.data.text_tokenizer import load_text_tokenizer
from dist_tempnet.data.tokens import make_token_shards

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BatchStream",
    "CorruptShardError",
    "EvalBatches",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "clip_batches",
    "eval_batches",
    "index_shards",
    "load_text_tokenizer",
    "make_chat_shards",
    "make_demo_clip_dataset",
    "make_demo_text_dataset",
    "make_pair_shards",
    "make_token_shards",
    "read_manifest",
    "resolve_manifest",
    "token_batches",
    "write_image_text_shards",
]
