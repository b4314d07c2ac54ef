"""CLIP DRO loss benchmark (DESIGN §6): our distributed form vs the full-matrix reference design.

    python benchmarks/clip_dro_loss.py            # K = 2 and 4 gloo processes, B = 256 per rank, d = 512
    python benchmarks/clip_dro_loss.py --tiny     # seconds-long smoke run

Both variants run in the same processes, interleaved step by step so they share the machine's
noise: forward + backward of the loss only, TempNets included, features given as fp32 leaf tensors.
Per step, the time is the slowest rank's; reported is the median over the measured steps.

- ours: `GlobalDROContrastiveLoss` — features all-gathered without gradient, each rank computes its
  B×n rows and n×B columns, per-sample scalars exchanged, state sharded.
- reference: the design of the paper's code — features all-gathered with gradient
  (`comm.all_gather_with_grad`: all-reduce of the n×d feature gradient in backward, as needed for
  the correct ∇F), every rank runs both TempNets on all n samples and computes the full n×n loss,
  and u is a dataset-sized table replicated on every rank (plain u, no shift: fine at these τ).

Bytes per step are the sizes of the tensors each rank passes to collectives (comm's counter).
The run also checks that both give the same local feature gradients on the first step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dist_tempnet import comm
from dist_tempnet.losses.contrastive import GlobalDROContrastiveLoss
from dist_tempnet.tempnet import CLIPTempNet

GAMMA, RHO = 0.9, 6.0
GRAD_TOLERANCE = 1e-4  # fp32: both compute the same ∇F, in a different order


@dataclass
class Setup:
    world_size: int
    batch: int
    dim: int
    warmup: int
    steps: int
    num_prototypes: int

    @property
    def n(self) -> int:
        return self.world_size * self.batch

    @property
    def num_samples(self) -> int:
        return 4 * self.n  # ids repeat across steps, as over epochs


class FullMatrixReference(nn.Module):
    """Every rank computes F on the whole n×n matrix, through features gathered with gradient."""

    def __init__(self, num_samples: int, image_tempnet: nn.Module, text_tempnet: nn.Module) -> None:
        super().__init__()
        self.image_tempnet, self.text_tempnet = image_tempnet, text_tempnet
        self.u_image = torch.zeros(num_samples)  # replicated on every rank
        self.u_text = torch.zeros(num_samples)
        self.visited = torch.zeros(num_samples, dtype=torch.bool)

    def _update_u(self, ids: torch.Tensor, g_image: torch.Tensor, g_text: torch.Tensor):
        seen = self.visited[ids]
        u_image = torch.where(seen, (1 - GAMMA) * self.u_image[ids] + GAMMA * g_image, g_image)
        u_text = torch.where(seen, (1 - GAMMA) * self.u_text[ids] + GAMMA * g_text, g_text)
        self.u_image[ids], self.u_text[ids], self.visited[ids] = u_image, u_text, True
        return u_image, u_text

    def forward(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        all_image, all_text = comm.all_gather_with_grad(image), comm.all_gather_with_grad(text)
        all_ids = comm.gather_no_grad(ids)
        tau_image, tau_text = self.image_tempnet(all_image), self.text_tempnet(all_text)
        n = all_ids.numel()
        sim = all_image @ all_text.t()
        pos = sim.diagonal()
        d_image, d_text = sim - pos[:, None], sim - pos[None, :]
        off = ~torch.eye(n, dtype=torch.bool)
        with torch.no_grad():
            e_image = torch.exp(d_image / tau_image[:, None]) * off
            e_text = torch.exp(d_text / tau_text[None, :]) * off
            u_image, u_text = self._update_u(all_ids, e_image.sum(1) / (n - 1), e_text.sum(0) / (n - 1))
            w_image = e_image / ((n - 1) * u_image[:, None])
            w_text = e_text / ((n - 1) * u_text[None, :])
            grad_tau_image = u_image.log() + RHO - (w_image * d_image).sum(1) / tau_image
            grad_tau_text = u_text.log() + RHO - (w_text * d_text).sum(0) / tau_text
        model_loss = ((w_image * d_image).sum() + (w_text * d_text).sum()) / n
        temp_loss = ((grad_tau_image * tau_image).sum() + (grad_tau_text * tau_text).sum()) / n
        return model_loss + temp_loss


def _step_inputs(setup: Setup, step: int, rank: int):
    gen = torch.Generator().manual_seed(step)
    image = F.normalize(torch.randn(setup.n, setup.dim, generator=gen), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(setup.n, setup.dim, generator=gen), dim=-1)
    ids = torch.randperm(setup.num_samples, generator=gen)[: setup.n]
    rows = slice(rank * setup.batch, (rank + 1) * setup.batch)
    return image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_(), ids[rows]


def _timed_step(loss_fn: nn.Module, inputs) -> tuple[float, int, torch.Tensor]:
    """Slowest rank's seconds, this rank's bytes, this rank's image-feature gradient."""
    image, text, ids = inputs
    dist.barrier()
    comm.reset_bytes()
    start = time.perf_counter()
    out = loss_fn(image, text, ids)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    sent = comm.bytes_sent()
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # timing bookkeeping, not counted
    return float(elapsed), sent, image.grad


def _worker(rank: int, setup: Setup, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=setup.world_size,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    try:
        torch.manual_seed(0)
        nets = [CLIPTempNet(setup.dim, setup.num_prototypes) for _ in range(2)]
        ours = GlobalDROContrastiveLoss(setup.num_samples, GAMMA, RHO, *nets)
        reference = FullMatrixReference(setup.num_samples, *nets)
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        sent: dict[str, int] = {}
        grad_diff = 0.0
        for step in range(setup.warmup + setup.steps):
            grads = {}
            for name, loss_fn in (("ours", ours), ("reference", reference)):
                seconds, sent[name], grads[name] = _timed_step(loss_fn, _step_inputs(setup, step, rank))
                if step >= setup.warmup:
                    times[name].append(seconds)
            if step == 0:  # same fresh state on both sides: the gradients must agree
                scale = grads["reference"].abs().max().clamp_min(1e-30)
                grad_diff = float((grads["ours"] - grads["reference"]).abs().max() / scale)
        diff = torch.tensor([grad_diff], dtype=torch.float64)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if rank == 0:
            result = {"times": times, "bytes": sent, "grad_rel_diff": float(diff), "setup": asdict(setup)}
            with open(result_path, "w") as fh:
                json.dump(result, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(setup: Setup) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.start_processes(
            _worker,
            args=(setup, _free_port(), path),
            nprocs=setup.world_size,
            join=True,
            start_method="spawn",
        )
        with open(path) as fh:
            return json.load(fh)


def _row(result: dict) -> str:
    setup = result["setup"]
    ours, ref = (statistics.median(result["times"][k]) for k in ("ours", "reference"))
    k = setup["world_size"]
    b_ours, b_ref = result["bytes"]["ours"], result["bytes"]["reference"]
    timing = f"{k:>2} {k * setup['batch']:>6} {1e3 * ours:>9.1f} {1e3 * ref:>9.1f}"
    timing += f" {ours / ref:>11.3f} {2 / k:>9.2f}"
    traffic = f"{b_ours / 1024:>12.1f} {b_ref / 1024:>12.1f} {b_ours / b_ref:>11.3f}"
    return f"{timing} {traffic} {result['grad_rel_diff']:>10.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (K=2, B=8, d=16)")
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--batch", type=int, default=256, help="pairs per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.tiny:
        args.world_sizes, args.batch, args.dim, args.warmup, args.steps = "2", 8, 16, 1, 2
    world_sizes = [int(k) for k in args.world_sizes.split(",")]
    prototypes = 256 if not args.tiny else 8
    print(
        f"CLIP DRO loss, gloo on CPU (1 thread per process, {os.cpu_count()} CPUs), B={args.batch} per rank, "
        f"d={args.dim}, fp32, forward+backward of the loss with both TempNets; "
        f"median of {args.steps} steps after {args.warmup} warm-ups (slowest rank per step)"
    )
    print(
        " K      n   ours ms    ref ms  ratio o/r  expect 2/K  ours KiB/st   ref KiB/st  bytes o/r  grad diff"
    )
    worst = 0.0
    for k in world_sizes:
        result = run(Setup(k, args.batch, args.dim, args.warmup, args.steps, prototypes))
        worst = max(worst, result["grad_rel_diff"])
        print(_row(result), flush=True)
    if worst > GRAD_TOLERANCE:
        sys.exit(
            f"ours and the reference disagree: relative gradient difference {worst:.1e} > {GRAD_TOLERANCE}"
        )


if __name__ == "__main__":
    main()
