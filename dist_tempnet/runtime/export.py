"""`dist-tempnet export`: a checkpoint → a transformers model directory loadable without DeepSpeed.

ZeRO-2/3 checkpoints are consolidated with DeepSpeed's own zero_to_fp32 reader (fp32 master
weights). The output directory holds the transformers model (`save_pretrained`), its tokenizer,
and the TempNet(s) as `tempnet.safetensors` + `tempnet_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_tempnet.config import config_from_dict
from dist_tempnet.runtime.checkpoint import load_trusted, read_meta, verify_checkpoint, weights_only_loads
from dist_tempnet.runtime.storage import local_checkpoint

TEMPNET_WEIGHTS = "tempnet.safetensors"
TEMPNET_CONFIG = "tempnet_config.json"


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The full module state dict of a checkpoint written by training (any ZeRO stage)."""
    verify_checkpoint(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    ds_dir = checkpoint_dir / "deepspeed"
    tag = meta["tag"]
    zero_stage = int(meta["config"]["deepspeed"]["zero_stage"])
    if zero_stage == 0:
        states = load_trusted(ds_dir / tag / "mp_rank_00_model_states.pt")
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


def restore_hf_scalar_shapes(model: nn.Module) -> None:
    """Undo make_scalar_params_1d for parameters the transformers class defines as 0-dim
    (CLIP's logit_scale), so `from_pretrained` loads the export without shape errors."""
    with torch.device("meta"):
        reference = type(model)(model.config)
    ref_shapes = {n: p.shape for n, p in reference.named_parameters()}
    for name, param in list(model.named_parameters()):
        if ref_shapes.get(name) == torch.Size([]) and param.shape == (1,):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, nn.Parameter(param.detach().reshape(()), requires_grad=param.requires_grad))


def tempnet_modules(module: nn.Module) -> dict[str, nn.Module]:
    """TempNets of a task module by role: {'lm': ...} or {'image': ..., 'text': ...}."""
    from dist_tempnet.tempnet import CLIPTempNet, LMTempNet

    found = {}
    if isinstance(getattr(module, "tempnet", None), LMTempNet):
        found["lm"] = module.tempnet
    loss_fn = getattr(module, "loss_fn", None)
    for side in ("image", "text"):
        net = getattr(loss_fn, f"{side}_tempnet", None)
        if isinstance(net, CLIPTempNet):
            found[side] = net
    return found


def _tempnet_config(role: str, net: nn.Module) -> dict[str, Any]:
    if role == "lm":
        return {
            "class": "LMTempNet",
            "vocab_size": net.vocab_size,
            "hidden_size": net.hidden_size,
            "tau_min": net.tau_min,
            "tau_max": net.tau_max,
        }
    return {
        "class": "CLIPTempNet",
        "embed_dim": net.embed_dim,
        "num_prototypes": net.num_prototypes,
        "tau_min": net.tau_min,
        "tau_max": net.tau_max,
    }


def save_tempnets(nets: dict[str, nn.Module], out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{role}.{k}": v.detach().float().contiguous().cpu()
        for role, net in nets.items()
        for k, v in net.state_dict().items()
    }
    save_file(tensors, str(out / TEMPNET_WEIGHTS))
    (out / TEMPNET_CONFIG).write_text(
        json.dumps({role: _tempnet_config(role, n) for role, n in nets.items()}, indent=1)
    )


def load_tempnets(model_dir: str | Path) -> dict[str, nn.Module]:
    """TempNets saved by `export` (empty dict when the export has none)."""
    from safetensors.torch import load_file

    from dist_tempnet.tempnet import CLIPTempNet, LMTempNet

    model_dir = Path(model_dir)
    if not (model_dir / TEMPNET_CONFIG).is_file():
        return {}
    specs = json.loads((model_dir / TEMPNET_CONFIG).read_text())
    tensors = load_file(str(model_dir / TEMPNET_WEIGHTS))
    nets: dict[str, nn.Module] = {}
    for role, spec in specs.items():
        spec = dict(spec)
        cls = {"LMTempNet": LMTempNet, "CLIPTempNet": CLIPTempNet}[spec.pop("class")]
        net = cls(**spec)
        prefix = f"{role}."
        net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        nets[role] = net.eval()
    return nets


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` from a complete training checkpoint; returns it."""
    from dist_tempnet.tasks import build_task

    checkpoint_dir, out = local_checkpoint(checkpoint_dir), Path(out_dir)
    verify_checkpoint(checkpoint_dir)  # before anything is built or loaded
    meta = read_meta(checkpoint_dir)
    cfg = config_from_dict(meta["config"])
    task = build_task(cfg, rank=0, world=1, device=torch.device("cpu"))
    module: nn.Module = task.module
    state = consolidated_state_dict(checkpoint_dir)
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Tied weights appear once in the consolidated dict; anything else missing is an error.
    missing = [k for k in missing if not _is_tied_alias(module, k)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint '{checkpoint_dir}' does not match the model of its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf_model = module.lm if cfg.run.task == "lm" else module.clip
    restore_hf_scalar_shapes(hf_model)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    nets = tempnet_modules(module)
    if nets:
        save_tempnets(nets, out)
    (out / "dist_tempnet_export.json").write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint_dir),
                "step": meta["step"],
                "task": cfg.run.task,
                "method": cfg.loss.name,
                "mlflow_run_id": meta.get("mlflow_run_id", ""),
            },
            indent=1,
        )
    )
    return out


def _is_tied_alias(module: nn.Module, key: str) -> bool:
    lm = getattr(module, "lm", None)
    if lm is None or not key.startswith("lm."):
        return False
    out_emb = lm.get_output_embeddings()
    return (
        out_emb is not None
        and out_emb.weight is lm.get_input_embeddings().weight
        and key.endswith("lm_head.weight")
    )
