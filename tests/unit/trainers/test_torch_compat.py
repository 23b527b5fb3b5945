"""The torch internals of trainers.compat exist in the installed torch and behave as relied on:
a whole checkpoint comes back from an empty dict, which the public dcp.load does not do."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from trainers.compat import fsspec_checkpoint_reader, load_whole_checkpoint


def test_a_whole_checkpoint_loads_into_an_empty_dict_and_the_public_load_would_not(tmp_path):
    saved = {"policy": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"state": {"step": 3}, "lr": [0.1, 0.2]}}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    loaded = load_whole_checkpoint(dcp.FileSystemReader(str(tmp_path)))
    assert torch.equal(loaded["policy"]["w"], saved["policy"]["w"])
    assert loaded["optimizer"] == {"state": {"step": 3}, "lr": [0.1, 0.2]}
    # Why the private loader: if the public one learns to fill an empty dict, compat can use it.
    public: dict = {}
    dcp.load(public, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    assert public == {}, "dcp.load now fills an empty dict: use it in trainers.compat.load_whole_checkpoint"


def test_the_fsspec_reader_reads_a_checkpoint_by_uri(tmp_path):
    saved = {"policy": {"w": torch.ones(4)}}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    state = {"policy": {"w": torch.zeros(4)}}
    dcp.load(state, storage_reader=fsspec_checkpoint_reader(f"file://{tmp_path}"), no_dist=True)
    assert torch.equal(state["policy"]["w"], torch.ones(4))


def test_only_the_named_entries_of_a_checkpoint_are_loaded(tmp_path):
    from trainers.compat import load_checkpoint_entries

    saved = {"policy": {"model.w": torch.arange(4.0)}, "reference": {"model.w": torch.ones(4)},
             "optimizer": {"state": {"model.w": {"exp_avg": torch.zeros(4)}}}}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    loaded = load_checkpoint_entries(dcp.FileSystemReader(str(tmp_path)), {"reference"})
    assert list(loaded) == ["reference"]
    assert torch.equal(loaded["reference"]["model.w"], torch.ones(4))
