"""`dist-tempnet make-shards` input errors: one clear line naming the file, exit 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_tempnet.commands import cli
from dist_tempnet.data.text_tokenizer import BPE_EOS, build_word_level_tokenizer, save_hf_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    tok = build_word_level_tokenizer(["the cat sat on the mat", BPE_EOS])
    return save_hf_tokenizer_dir(
        tok, tmp_path_factory.mktemp("tok") / "tok", eos_token="[EOS]", pad_token="[PAD]"
    )


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["make-shards", *argv])
    captured = capsys.readouterr()
    return rc, captured.err


def test_text_without_files_is_an_error(tmp_path, capsys, tokenizer):
    with pytest.raises(SystemExit) as info:  # argparse: --text takes one or more inputs
        _run(capsys, "--out", str(tmp_path / "out"), "--text", "--tokenizer", str(tokenizer))
    assert info.value.code == 2 and "--text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "the CLIP demo set is not built instead"


def test_invalid_utf8_names_file_and_offset_and_writes_nothing(tmp_path, capsys, tokenizer):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("the cat sat on the mat\n" * 200)
    bad.write_bytes(b"the cat sat\n" * 10 + b"caf\xe9 on the mat\n")
    out = tmp_path / "out"
    rc, err = _run(capsys, "--out", str(out), "--text", str(good), str(bad), "--tokenizer", str(tokenizer),
                   "--seq-len", "8")  # fmt: skip
    assert rc == 2 and f"{bad}: not valid UTF-8 at byte 123" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(out.rglob("dataset.json")), "no split is published"


def test_existing_dataset_says_use_overwrite(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo"), "--num-train", "32", "--num-eval", "16"]
    assert _run(capsys, *args)[0] == 0
    rc, err = _run(capsys, *args)
    assert rc == 2 and "use --overwrite" in err and "overwrite=True" not in err
    assert len(err.strip().splitlines()) == 1
    assert _run(capsys, *args, "--overwrite")[0] == 0
