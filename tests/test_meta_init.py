"""The prior built on the meta device, sharded, then each rank's shards filled
(dalle_core.distributed.init, dalle_core.prior.init): the same model for any
world size, and `dalle plan`'s per-rank parameter memory equal to the shards
FSDP2 really makes of paper-12B on 8 GPUs a machine (built on meta: no memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_core.distributed.checkpoint import canonical_key
from dalle_core.distributed.init import chunk_rows, chunk_seed, fill_tensor, max_chunk_bytes
from dalle_core.distributed.parallelize import apply_activation_checkpointing
from dalle_core.distributed.plan import plan
from dalle_core.precision import PerResblockGradScaler, apply_per_resblock_grad_scaling
from dalle_core.prior.init import init_prior_weights, materialize_prior, prior_init_rules
from dalle_core.prior.model import DalleTransformer
from dalle_core.prior.train import train_prior
from dalle_core.profiles import get_profile

from test_distributed import check, torchrun

ROOT = Path(__file__).resolve().parent.parent
TINY = get_profile("tiny").prior
TRAINING = get_profile("tiny").prior_training


def unsharded(seed: int, config=TINY, **kw) -> dict[str, torch.Tensor]:
    model = DalleTransformer(config)
    init_prior_weights(model, seed, **kw)
    return model.state_dict()


def test_rules_are_init_weights_distributions():
    torch.manual_seed(0)
    ref = DalleTransformer(TINY)  # the model's own init_weights
    mine = unsharded(3)
    rules = prior_init_rules(ref, TINY)
    assert set(rules) == set(mine) == set(ref.state_dict())
    for name, theirs in ref.state_dict().items():
        kind, std = rules[name]
        if kind in ("zeros", "ones"):
            assert torch.equal(mine[name], theirs), name
        else:  # same distribution, other draws
            assert std == pytest.approx(float(theirs.std()), rel=0.2), name
            assert float(mine[name].std()) == pytest.approx(std, rel=0.2), name
            assert not torch.equal(mine[name], theirs)
    assert rules["blocks.1.mlp.mlp.proj.weight"] == ("normal", pytest.approx(0.02 / 8 ** 0.5))


def test_meta_wrapped_model_gets_the_unsharded_values():
    ref = unsharded(11)
    with torch.device("meta"):
        model = DalleTransformer(TINY)
    apply_per_resblock_grad_scaling(model, PerResblockGradScaler(list(model.resblocks())))
    apply_activation_checkpointing(model)
    materialize_prior(model, "cpu", 11)
    got = {canonical_key(k): v for k, v in model.state_dict().items()}
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not all(torch.equal(a, b) for a, b in zip(unsharded(12).values(), ref.values()))  # the seed matters


def test_chunks_depend_on_the_shape_only():
    # rows of a [10, 3] parameter in chunks of 2 rows (chunk_numel 7): filling rows 3..8 of a view
    # gives exactly rows 3..8 of the whole fill
    assert chunk_rows((10, 3), 7) == 2 and chunk_rows((5,), 7) == 7 and chunk_rows((2, 100), 7) == 1
    assert max_chunk_bytes([(10, 3), (2, 100), (5,)], 7) == 100 * 4
    assert chunk_seed(0, "a", 1) != chunk_seed(0, "a", 2) != chunk_seed(1, "a", 1)
    whole = torch.empty(10, 3)
    fill_tensor(whole, "w", "normal", 1.0, 5, chunk_numel=7)
    g = torch.Generator().manual_seed(chunk_seed(5, "w", 1))
    assert torch.equal(whole[2:4], torch.empty(2, 3).normal_(0.0, 1.0, generator=g))


@pytest.mark.timeout(60)
def test_train_prior_starts_from_the_meta_init(tmp_path):
    result = train_prior(TINY, TRAINING, lambda s: iter(()), tmp_path, total_steps=0, seed=21)
    got = result.model.state_dict()
    ref = unsharded(21)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.timeout(170)
@pytest.mark.parametrize("nproc", [1, 4])
def test_sharded_init_equals_unsharded_on_gloo(nproc, tmp_path):
    """1 process (a 1 x 1 mesh) and 4 (2 x 2, 1 x 4 and 4 x 1): the gathered parameters are the
    unsharded init bitwise, for the tiny prior and for one whose rows 2, 3, 4 ranks do not divide
    (uneven, padded shards) drawn in chunks of 16 values (chunk boundaries inside shards)."""
    out = tmp_path / "init.json"
    check(torchrun([str(ROOT / "tests" / "meta_init_worker.py"), str(out)], nproc=nproc))
    r = json.loads(out.read_text())
    expected = {1: {"1x1"}, 4: {"1x4", "2x2", "4x1"}}[nproc]
    assert {k.split("/")[0] for k in r["layouts"]} == expected
    for key, entry in r["layouts"].items():
        assert entry["max_abs_diff"] == 0.0, key
        nodes, gpus = map(int, key.split("/")[0].split("x"))
        config = TINY if key.endswith("/tiny") else None
        by_rank = entry["local_numel_by_rank"]
        if config is not None:  # each machine's shards add up to the whole model
            n = sum(p.numel() for p in DalleTransformer(config).parameters())
            assert sum(by_rank[:gpus]) == n, key
        if "powersgd_bytes" in entry:
            assert entry["powersgd_bytes"] > 0
    if nproc == 4:
        assert r["layouts"]["1x4/odd_small_chunks"]["local_numel_by_rank"] == [618, 618, 610, 506]


SHARD_SHAPES = r"""
import json, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from dalle_core.distributed.parallelize import apply_fsdp
from dalle_core.prior.config import PriorConfig
from dalle_core.prior.model import DalleTransformer
from dalle_core.profiles import get_profile

cases = {"paper-12B": (get_profile("paper-12B").prior, 8),
         "odd": (PriorConfig(n_layer=2, n_head=2, d_head=4, text_vocab_size=16, text_len=4,
                             image_vocab_size=8, image_grid=2, conv_kernel=1), 3)}
out = {}
for label, (cfg, g) in cases.items():
    ranks = []
    for r in range(g):  # one process plays each rank of a machine in turn (fake process group)
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=g)
        with torch.device("meta"):
            model = DalleTransformer(cfg)
        apply_fsdp(model, init_device_mesh("cpu", (g,)))
        local = [p.to_local() for p in model.parameters()]
        padded = 0
        for m in model.modules():
            state = getattr(m, "_get_fsdp_state", None)
            if state is None:
                continue
            for group in state()._fsdp_param_groups:
                padded += sum(fp.padded_sharded_param_size.numel() for fp in group.fsdp_params)
        ranks.append({"numel": sum(t.numel() for t in local), "bytes": sum(t.numel() * t.element_size() for t in local),
                      "padded": padded, "meta": all(t.is_meta for t in local)})
        dist.destroy_process_group()
    out[label] = ranks
json.dump(out, sys.stdout)
"""


@pytest.mark.timeout(120)
def test_plan_parameter_memory_is_the_real_shards_of_paper_12b():
    proc = subprocess.run([sys.executable, "-c", SHARD_SHAPES], cwd=ROOT, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = json.loads(proc.stdout)
    p = plan(get_profile("paper-12B").prior, nodes=128, gpus_per_node=8, batch_size_per_gpu=1, powersgd_rank=112)
    m = p.rank_memory
    assert len(shards["paper-12B"]) == 8
    for rank in shards["paper-12B"]:
        assert rank["meta"]  # built and sharded without allocating anything
        # every first dimension of paper-12B divides by 8: equal shards, no padding
        assert rank["numel"] == rank["padded"] == p.params_per_gpu == m.shard_numel == 1_536_728_528
        assert rank["bytes"] == m.device_params  # fp32 sharded parameters: 5.72 GiB
    assert m.device_grads == m.device_ema == m.device_params and m.device_adam == 2 * m.device_params
    # FSDP pads dim 0 to a multiple of g: the plan counts each rank's padded shard (3 GPUs, odd shapes)
    from test_plan import SMALL

    small = plan(SMALL, nodes=1, gpus_per_node=3, batch_size_per_gpu=1)
    odd = shards["odd"]
    assert [r["padded"] for r in odd] == [small.params_per_gpu] * 3 == [819] * 3
    assert max(r["numel"] for r in odd) <= 819 and sum(r["numel"] for r in odd) == small.n_params


def test_plan_per_rank_memory_at_paper_12b_by_hand():
    p = plan(get_profile("paper-12B").prior, nodes=128, gpus_per_node=8, batch_size_per_gpu=1, powersgd_rank=112)
    m = p.rank_memory
    P, shard = p.n_params, p.params_per_gpu
    assert m.device_sharded_state == shard * (4 + 4 + 8 + 4)  # params, grads, AdamW moments, EMA: fp32
    # gathered: root + the current and the prefetched layer, and root + one layer of gradients, fp32
    layer = p.n_params_layers // 64
    assert m.device_gathered == (p.n_params_root + 2 * layer) * 4 + (p.n_params_root + layer) * 4
    # PowerSGD error feedback: the four weight matrices of each layer's shard, fp32:
    # qkv [3 d / 8, d], proj [d / 8, d], fc [4 d / 8, d], MLP proj [d / 8, 4 d] = 12 d^2 / 8 a layer
    d = 3968
    assert m.device_powersgd_errors == 64 * 12 * d * d // 8 * 4
    # the paper's fixed Q per matrix: cols x 112, fp32 (cols d, d, d, 4 d)
    assert m.device_powersgd_q == 64 * (d + d + d + 4 * d) * 112 * 4
    assert m.device_activations == p.mem_activations
    assert m.device_peak < 80 * 2**30  # fits an 80 GiB H100 with 40 GiB to spare
    assert m.device_peak == pytest.approx(40.53 * 2**30, rel=1e-3)
    # host: one init chunk of 2^22 fp32 values instead of the whole model on every rank
    assert m.host_init_chunk <= 2**22 * 4 and m.host_full_build_before == 4 * P
    assert m.host_final_save_rank0 == 8 * P and m.host_final_save_other == 4 * P
