"""BatchNorm running statistics averaged over the ranks after each epoch
(:func:`refseg.train.engine.average_norm_stats`), in a real 2-rank gloo group: every rank ends with the
mean of what each rank's batches left, in the buffers' own dtype; the step counters and weights are
untouched; one process alone changes nothing."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from refseg.train.engine import average_norm_stats


def model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2, affine=False),
                               torch.nn.BatchNorm2d(2, track_running_stats=False)).to(dtype)


def trained(rank: int, dtype: torch.dtype) -> torch.nn.Module:
    """Three train-mode forwards on this rank's own data: each rank's running stats differ."""
    net = model(dtype).train()
    data = torch.Generator().manual_seed(10 + rank)
    for _ in range(3):
        net(torch.randn(4, 3, 8, 8, generator=data).mul(1 + rank).add(rank).to(dtype))
    return net


def rank_main(rank: int, world: int, port: int, dtype: torch.dtype, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    net = trained(rank, dtype)
    weights = {k: v.clone() for k, v in net.named_parameters()}
    layers = average_norm_stats(net)
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())
    torch.save({"layers": layers, "state": net.state_dict()}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_end_with_the_mean_of_their_running_stats(tmp_path, dtype):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port, dtype, str(tmp_path)), nprocs=2)
    after = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    before = [trained(r, dtype).state_dict() for r in range(2)]
    assert after[0]["layers"] == after[1]["layers"] == 2  # the untracked layer has nothing to average
    for key, value in after[0]["state"].items():
        assert value.dtype == before[0][key].dtype and torch.equal(value, after[1]["state"][key]), key
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(before[0][key], before[1][key]), key  # there was something to average
            mean = ((before[0][key].float() + before[1][key].float()) / 2).to(dtype)
            assert torch.equal(value, mean), key
        elif key.endswith("num_batches_tracked"):
            assert int(value) == 3
        else:
            assert torch.equal(value, before[0][key]), key


def test_one_process_changes_nothing():
    net = trained(1, torch.float32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert average_norm_stats(net) == 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
