"""Per-sample partition statistics of the DRO contrastive losses, sharded by sample id (DESIGN §2.2).

Rank r of K owns the samples with `id % K == r` and keeps them at local row `id // K`, so each rank
holds O(N/K) rows and the owner of any id is known without a lookup table.

A row holds, in float64:

- `u_image`, `shift_image`, `u_text`, `shift_text`: the moving estimate u of each anchor's
  partition function g, stored as u = u_hat·exp(shift). With |d| ≤ 2 and τ = 0.005, exp(d/τ)
  reaches e^400: far beyond float32 (and float64 below τ ≈ 0.003), so the losses keep every
  sample's u relative to its own shift (see losses/contrastive.py for how the shift is chosen);
- optional extra fields declared by a loss (e.g. iSogCLR's per-sample temperatures), each with
  its initial value;
- `visited`: whether the sample has been seen (its first visit sets u = g).

Checkpoints: every rank saves its own shard (`save` / `save_to_directory`, or puts `state_dict()`
into its own per-rank checkpoint file); a run resumed with the same world size loads its own shard
(`load` / `load_state_dict`), one with a different world size rebuilds its shard from all old
shards (`load_resharded` / `from_directory` for shard files, `from_shard_states` for state dicts),
reading them one at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

U_FIELDS: tuple[str, ...] = ("u_image", "shift_image", "u_text", "shift_text")
FORMAT = "dist_tempnet.dro_state/v1"
_SHARD_NAME = "dro_state_rank{rank:05d}.pt"
_SHARD_PATTERN = re.compile(r"dro_state_rank(\d+)\.pt$")


def shard_filename(rank: int) -> str:
    """File name `save_to_directory` uses for `rank`'s shard."""
    return _SHARD_NAME.format(rank=rank)


def num_owned(num_samples: int, rank: int, world_size: int) -> int:
    """How many ids in [0, num_samples) satisfy id % world_size == rank."""
    return max(0, (num_samples - rank + world_size - 1) // world_size)


def _last_occurrence_source(ids: torch.Tensor) -> torch.Tensor:
    """For each position, the position of the last occurrence of its id.

    Writing `values[_last_occurrence_source(ids)]` at `ids` makes every duplicate write the same
    row, so the result is deterministic without filtering (a data-dependent shape would need a
    host sync on an accelerator).
    """
    n = ids.numel()
    sorted_ids, order = torch.sort(ids, stable=True)
    positions = torch.arange(n, device=ids.device)
    is_last = torch.ones(n, dtype=torch.bool, device=ids.device)
    is_last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    # End of each run of equal ids in sorted order: a reverse running minimum of the run ends.
    ends = torch.where(is_last, positions, n).flip(0).cummin(0).values.flip(0)
    source = torch.empty_like(order)
    source[order] = order[ends]
    return source


class DROState:
    """This rank's shard of the per-sample statistics."""

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        extra_fields: Mapping[str, float] | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"DROState needs num_samples > 0, got {num_samples}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"DROState needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        extra = dict(extra_fields or {})
        clash = set(extra) & (set(U_FIELDS) | {"visited"})
        if clash:
            raise ValueError(f"extra_fields may not reuse the built-in names {sorted(clash)}")
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.fields: tuple[str, ...] = U_FIELDS + tuple(extra)
        self.initial_values: dict[str, float] = {name: 0.0 for name in U_FIELDS} | extra
        rows = num_owned(self.num_samples, self.rank, self.world_size)
        init = torch.tensor([self.initial_values[f] for f in self.fields], dtype=torch.float64)
        # One scratch row past the end takes the writes of ids this rank does not own, so lookups
        # and updates need no boolean-mask indexing (a host sync on an accelerator).
        self._scratch = rows
        self._table = init.to(self.device).repeat(rows + 1, 1)
        self._visited = torch.zeros(rows + 1, dtype=torch.bool, device=self.device)
        self.table = self._table[:rows]
        self.visited = self._visited[:rows]

    # ---------------------------------------------------------------- per-step access

    @property
    def num_local(self) -> int:
        return self.table.shape[0]

    def column(self, name: str) -> int:
        """Index of field `name` in `table` and in the rows `lookup` returns."""
        return self.fields.index(name)

    def field(self, name: str) -> torch.Tensor:
        """This shard's values of one field (a view, indexed by local row = id // world_size)."""
        return self.table[:, self.column(name)]

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"sample ids must be an integer tensor, got {ids.dtype}")
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.long)
        if not ids.numel():
            return ids
        in_range = (ids.min() >= 0) & (ids.max() < self.num_samples)
        message = f"sample ids must lie in [0, {self.num_samples}) (num_samples of this DRO state)"
        if ids.device.type != "cpu":
            torch._assert_async(in_range, message)  # checked on the device, no host sync
        elif not bool(in_range):
            raise ValueError(f"{message}, got min {int(ids.min())}, max {int(ids.max())}")
        return ids

    def _local_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned mask, local row of each id; the scratch row for ids owned elsewhere)."""
        owned = self.owned_mask(ids)
        return owned, torch.where(owned, ids // self.world_size, self._scratch)

    def owned_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids % self.world_size == self.rank

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [len(ids), len(fields) + 1] (fields then visited as 0/1), float64, on ids' device.

        Rows of ids this rank does not own are zero, so summing every rank's lookup over the same
        ids (an all-reduce) yields the complete rows.
        """
        out_device = ids.device
        ids = self._check_ids(ids)
        owned, local = self._local_rows(ids)
        out = torch.cat([self._table[local], self._visited[local].to(torch.float64).unsqueeze(1)], dim=1)
        return torch.where(owned.unsqueeze(1), out, 0.0).to(out_device)

    def update(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Store `values` [len(ids), len(fields)] for the owned ids and mark them visited.

        Rows of ids owned elsewhere are ignored; an id repeated in `ids` keeps its last row.
        """
        ids = self._check_ids(ids)
        values = values.to(device=self.device, dtype=torch.float64)
        if values.shape != (ids.numel(), len(self.fields)):
            raise ValueError(
                f"DROState.update expects values of shape ({ids.numel()}, {len(self.fields)}) "
                f"for fields {self.fields}, got {tuple(values.shape)}"
            )
        values = values[_last_occurrence_source(ids)]
        _, local = self._local_rows(ids)
        self._table[local] = values
        self._visited[local] = True

    def global_ids(self) -> torch.Tensor:
        """Sample id of each local row."""
        return torch.arange(self.num_local, device=self.device) * self.world_size + self.rank

    # ---------------------------------------------------------------- state dict / files

    def _metadata(self) -> dict[str, torch.Tensor]:
        return {
            "num_samples": torch.tensor(self.num_samples),
            "world_size": torch.tensor(self.world_size),
            "rank": torch.tensor(self.rank),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (metadata as 0-dim int64), so it can sit inside a module's state_dict."""
        out = self._metadata()
        for name in self.fields:
            out[name] = self.field(name).clone()
        out["visited"] = self.visited.clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Load a shard saved by the same rank at the same world size and num_samples."""
        expected = {"num_samples": self.num_samples, "world_size": self.world_size, "rank": self.rank}
        for key, want in expected.items():
            if key not in state:
                raise KeyError(f"{source}: DRO state entry '{key}' is missing")
            got = int(state[key])
            if got != want:
                hint = " (use DROState.load_resharded to change world size)" if key != "num_samples" else ""
                raise ValueError(f"{source}: DRO state has {key}={got}, this rank expects {key}={want}{hint}")
        missing = [name for name in (*self.fields, "visited") if name not in state]
        if missing:
            raise KeyError(f"{source}: DRO state is missing fields {missing} (expected {self.fields})")
        for name in self.fields:
            values = state[name]
            if values.shape != (self.num_local,):
                raise ValueError(
                    f"{source}: DRO state field '{name}' has shape {tuple(values.shape)}, "
                    f"expected ({self.num_local},)"
                )
            self.table[:, self.column(name)] = values.to(self.device, torch.float64)
        self.visited.copy_(state["visited"].to(self.device, torch.bool))

    def save(self, path: str | os.PathLike) -> None:
        """Write this rank's shard atomically (tmp file + os.replace): a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "fields": list(self.fields), "initial_values": self.initial_values}
        payload["state"] = {k: v.cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def save_to_directory(self, directory: str | os.PathLike) -> Path:
        """Save as `directory/dro_state_rank{rank:05d}.pt` and return the path."""
        path = Path(directory) / shard_filename(self.rank)
        self.save(path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Load this rank's own shard (same world size); see `load_resharded` for a different one."""
        payload = _read_shard(path)
        self._check_fields(payload, path)
        self.load_state_dict(payload["state"], source=str(path))

    def _check_fields(self, payload: dict, path: str | os.PathLike) -> None:
        if tuple(payload["fields"]) != self.fields:
            raise ValueError(
                f"{path}: DRO state has fields {tuple(payload['fields'])}, expected {self.fields}"
            )

    @classmethod
    def load_resharded(
        cls,
        paths: Sequence[str | os.PathLike],
        rank: int,
        world_size: int,
        device: str | torch.device = "cpu",
        num_samples: int | None = None,
    ) -> DROState:
        """Build `rank`'s shard for `world_size` ranks from every shard file of an earlier run.

        `paths` must be exactly the old run's shards (one per old rank, any order, any old world
        size). If `num_samples` is given it must match the saved one (catches resuming on another
        dataset). Old shards are read one at a time (memory-mapped).
        """
        if not paths:
            raise ValueError("DROState.load_resharded needs the paths of all saved shards, got none")
        headers = [_read_header(p) for p in paths]
        _check_shard_set(headers, [str(p) for p in paths], num_samples)
        first = headers[0]
        new = cls(first["num_samples"], rank, world_size, device, extra_fields=first["initial_values_extra"])
        for path in paths:
            new._absorb(_read_shard(path)["state"])
        return new

    @classmethod
    def from_shard_states(
        cls,
        states: Sequence[Mapping[str, torch.Tensor]],
        rank: int,
        world_size: int,
        device: str | torch.device = "cpu",
        num_samples: int | None = None,
    ) -> DROState:
        """Like `load_resharded`, from every old rank's `state_dict()` already in memory.

        Every row of the new shard comes from an old shard, so the extra fields' initial values
        (not part of a state dict) are not needed.
        """
        if not states:
            raise ValueError("DROState.from_shard_states needs the state dicts of all old ranks, got none")
        names = [f"DRO state dict #{i}" for i in range(len(states))]
        headers = [_state_header(state, name) for state, name in zip(states, names)]
        _check_shard_set(headers, names, num_samples)
        extra = {name: 0.0 for name in headers[0]["fields"] if name not in U_FIELDS}
        new = cls(headers[0]["num_samples"], rank, world_size, device, extra_fields=extra)
        for state in states:
            new._absorb(state)
        return new

    def _absorb(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the rows of an old shard (any world size) that this shard owns."""
        old_rank, old_world = int(state["rank"]), int(state["world_size"])
        ids = torch.arange(state["visited"].numel()) * old_world + old_rank
        owned = self.owned_mask(ids)
        local = (ids[owned] // self.world_size).to(self.device)
        for name in self.fields:
            self.table[local, self.column(name)] = state[name][owned].to(self.device, torch.float64)
        self.visited[local] = state["visited"][owned].to(self.device, torch.bool)

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike,
        rank: int,
        world_size: int,
        device: str | torch.device = "cpu",
        num_samples: int | None = None,
    ) -> DROState:
        """`load_resharded` over every `dro_state_rank*.pt` in `directory` (see `save_to_directory`)."""
        directory = Path(directory)
        paths = sorted(p for p in directory.glob("dro_state_rank*.pt") if _SHARD_PATTERN.search(p.name))
        if not paths:
            raise FileNotFoundError(
                f"{directory}: no DRO state shards (expected files named {shard_filename(0)}, ...)"
            )
        return cls.load_resharded(paths, rank, world_size, device, num_samples)


def _read_shard(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DRO state shard not found")
    try:
        # mmap: reading a shard's header or a few of its rows does not load the whole shard.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"{path}: not a readable DRO state shard ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a DRO state shard (expected format '{FORMAT}')")
    return payload


_METADATA = ("num_samples", "world_size", "rank")


def _state_header(state: Mapping[str, torch.Tensor], source: str) -> dict:
    missing = [key for key in (*_METADATA, *U_FIELDS, "visited") if key not in state]
    if missing:
        raise KeyError(f"{source}: not a DRO state dict, missing {missing}")
    header = {key: int(state[key]) for key in _METADATA}
    header["fields"] = tuple(k for k in state if k not in _METADATA and k != "visited")
    return header


def _check_shard_set(headers: list[dict], sources: list[str], num_samples: int | None) -> None:
    """The shards must be exactly one per rank of one earlier run."""
    first, first_source = headers[0], sources[0]
    old_world = first["world_size"]
    for source, header in zip(sources, headers):
        for key in ("num_samples", "world_size"):
            if header[key] != first[key]:
                raise ValueError(
                    f"{source}: {key}={header[key]} but {first_source} has {key}={first[key]}; "
                    "the shards come from different runs"
                )
        if header["fields"] != first["fields"]:
            raise ValueError(
                f"{source}: fields {header['fields']} differ from {first_source}'s {first['fields']}"
            )
    found = sorted(h["rank"] for h in headers)
    if found != list(range(old_world)):
        missing = sorted(set(range(old_world)) - set(found))
        dupes = sorted({r for r in found if found.count(r) > 1})
        raise ValueError(
            f"DRO state shards were saved by {old_world} ranks; "
            f"expected one shard per rank 0..{old_world - 1}, "
            f"missing ranks {missing}, duplicated ranks {dupes} (got: {sources})"
        )
    if num_samples is not None and num_samples != first["num_samples"]:
        raise ValueError(
            f"{first_source}: DRO state was saved for num_samples={first['num_samples']}, "
            f"this run has num_samples={num_samples}"
        )


def _read_header(path: str | os.PathLike) -> dict:
    payload = _read_shard(path)
    header = _state_header(payload["state"], str(path))
    header["initial_values_extra"] = {k: v for k, v in payload["initial_values"].items() if k not in U_FIELDS}
    return header
