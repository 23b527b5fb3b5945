"""What trainers/ relies on in torch beyond its public API, and what differs between the
transformers versions pyproject.toml allows, in one place (trainers never import the orchestrator,
whose Ray side is :mod:`orchestrator.compat`). Checked against torch 2.13 (``constraints.txt`` and
the Makefile's ``TORCH_SPEC``); ``tests/unit/trainers/test_torch_compat.py`` fails, by name, when
an upgrade moves or changes one.
"""

from __future__ import annotations

import re


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()
    return int(major), int(minor)


def dtype_argument(dtype) -> dict:
    """The keyword that sets the dtype in ``from_pretrained`` / ``from_config``: ``dtype`` from
    transformers 4.56 on (``torch_dtype`` is deprecated there); before 4.56 an unknown ``dtype`` goes
    on to the model's ``__init__`` and fails, so ``torch_dtype``."""
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def fsspec_checkpoint_reader(uri: str, **storage_options):
    """A distributed-checkpoint reader over an fsspec URI (s3://, gs://, ...): torch ships it only
    in a private module (``FileSystemReader`` is local paths only)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(uri, **storage_options)


def load_whole_checkpoint(storage_reader) -> dict:
    """Every entry of a distributed checkpoint, unsharded, into a new dict, in this one process.

    The public ``dcp.load(state_dict, no_dist=True)`` loads only the keys ``state_dict`` already
    holds (it copies the keys into its own dict first), so an empty dict stays empty; torch's own
    ``dcp_to_torch_save`` fills one with the private planner and loader used here."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=storage_reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def load_checkpoint_entries(storage_reader, keys: set[str]) -> dict:
    """The top-level entries ``keys`` of a distributed checkpoint (e.g. ``{"policy"}``), unsharded,
    in this one process: only their bytes are read (an export skips the optimizer's state, twice
    the policy's size). Same private planner as :func:`load_whole_checkpoint`, with its key filter."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=storage_reader, planner=_EmptyStateDictLoadPlanner(keys=set(keys)), no_dist=True)
    return state
