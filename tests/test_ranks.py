"""How work is split over ranks, checked without launching processes."""

from types import SimpleNamespace

import pytest
import torch

from quartet.runs.distributed import Ranks, strip_prefix


def ranks(rank: int, world: int) -> Ranks:
    fake = SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           device=torch.device("cpu"), distributed_type=None)
    return Ranks(fake)


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (1, 2), (10, 3), (2, 4), (0, 3)])
def test_shares_are_contiguous_cover_every_item_once_and_differ_by_at_most_one(n, world):
    items = list(range(n))
    shares = [ranks(r, world).share(items) for r in range(world)]
    covered = [i for start, end in shares for i in items[start:end]]
    assert covered == items  # in rank order, nothing twice, nothing left out
    sizes = [end - start for start, end in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_sums_and_gathers_without_collectives():
    one = ranks(0, 1)
    assert not one.distributed
    assert one.sum_floats([1, 2.5]) == [1.0, 2.5]
    assert one.any(True) and not one.any(False)
    x = torch.arange(6).view(2, 3)
    assert one.gather_rows(x) is x and one.gather_objects(["a"]) == ["a"]


def test_indivisible_batch_names_the_setting_and_the_process_count():
    with pytest.raises(ValueError, match=r"ppo.rollout_batch_size = 10 must be divisible by the number of processes \(4\)"):
        ranks(0, 4).check_divisible(10, "ppo.rollout_batch_size")
    ranks(0, 4).check_divisible(12, "ppo.rollout_batch_size")


def test_strip_prefix_removes_the_wrapper_attribute_only():
    state = {"model.a": 1, "model.b.model.c": 2, "other": 3}
    assert strip_prefix(state, "model.") == {"a": 1, "b.model.c": 2, "other": 3}
    assert strip_prefix(None, "model.") is None


@pytest.mark.parametrize("max_norm", [None, 0.5, 3.0, 1e9])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.float64, torch.float32)])
def test_clip_grad_norm_equals_torch_bit_for_bit(max_norm, dtypes):
    from quartet.runs.distributed import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)) for dtype in dtypes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm is not None else float("inf"))
    assert clip_grad_norm(ours, max_norm) == float(expected)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
    if max_norm == 0.5:  # the norm was above the limit: clipped to it
        assert float(torch.nn.utils.get_total_norm([p.grad for p in ours])) == pytest.approx(0.5, rel=1e-5)


def test_prepare_steps_the_plain_optimizer_outside_deepspeed():
    """One process (as DDP and FSDP): Accelerate's optimizer wrapper adds only per-step Python, so
    the trainer gets the torch optimizer back; the model is the same module on one process."""
    from quartet.runs.distributed import make_accelerator

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    prepared, stepped = Ranks(make_accelerator("cpu")).prepare(model, optimizer)
    assert stepped is optimizer and prepared is model
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    stepped.step()
    assert not torch.equal(model.weight, before)
