"""`dist-tempnet generate --model EXPORT_DIR --prompt TEXT [--show-tau]`: sample with TempNet's τ."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dist_tempnet.models.generation import TempNetLogitsProcessor
from dist_tempnet.tempnet import LMTempNet


def load_for_generation(model_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, tempnet or None) from an exported directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_tempnet.runtime.export import load_tempnets

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: '{model_dir}' is not an exported model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tempnet = load_tempnets(model_dir).get("lm")
    return model, tokenizer, tempnet.to(device) if tempnet is not None else None


def generate_text(
    model,
    tokenizer,
    tempnet: LMTempNet | None,
    prompt: str,
    max_new_tokens: int = 40,
    do_sample: bool = True,
    seed: int = 0,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[str, list[str], list[float]]:
    """(continuation, generated tokens, τ per generated token — empty without TempNet).

    Sampling settings default to the model's generation config (its model card's); TempNet's τ
    divides the logits before them (see models.generation for the order).
    """
    from transformers import LogitsProcessorList

    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    processors = LogitsProcessorList()
    proc = None
    if tempnet is not None:
        proc = TempNetLogitsProcessor(tempnet)
        processors.append(proc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    overrides = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        logits_processor=processors,
        pad_token_id=pad,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    new_ids = out[0, enc["input_ids"].shape[1] :]
    tokens = [tokenizer.decode([t]) for t in new_ids.tolist()]
    taus = [float(t[0]) for t in proc.taus][: len(tokens)] if proc else []
    return tokenizer.decode(new_ids, skip_special_tokens=True), tokens, taus


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, tempnet = load_for_generation(args.model, args.device)
    if tempnet is None:
        print("(no TempNet in this export: generating at τ = 1)")
    if args.no_tempnet:
        tempnet = None
    text, tokens, taus = generate_text(
        model,
        tokenizer,
        tempnet,
        args.prompt,
        args.max_new_tokens,
        do_sample=not args.greedy,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    print(args.prompt + text)
    if args.show_tau and taus:
        print("\n".join(f"{tok!r:>20}  τ={tau:.4f}" for tok, tau in zip(tokens, taus)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with an exported LM, temperature set by its TempNet")
    p.add_argument("--model", required=True, help="directory written by `dist-tempnet export`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--greedy", action="store_true", help="argmax decoding (τ then does not change the output)"
    )
    p.add_argument("--show-tau", action="store_true", help="print the τ of each generated token")
    p.add_argument("--no-tempnet", action="store_true", help="ignore the TempNet (τ = 1) for comparison")
    p.add_argument("--seed", type=int, default=0)
    # Default: the export's generation_config.json (the model card's settings), applied after τ.
    p.add_argument("--temperature", type=float, default=None, help="override the generation config's")
    p.add_argument("--top-k", type=int, default=None, help="override the generation config's (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="override the generation config's (1: off)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_generate)
