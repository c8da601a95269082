"""The analytic planner, against arithmetic done by hand, and the paper's 12B figures."""

from __future__ import annotations

import pytest

from dalle_core.distributed.plan import plan
from dalle_core.distributed.powersgd import paper_compression, sent_numel, should_compress
from dalle_core.prior.config import PriorConfig, count_parameters
from dalle_core.profiles import get_profile

PAPER_12B = get_profile("paper-12B").prior
# d = 2 heads x 4 = 8, 2 layers, text: 16 BPE + 4 pads (L = 4), image: 8 codes on a 2 x 2 grid.
SMALL = PriorConfig(n_layer=2, n_head=2, d_head=4, text_vocab_size=16, text_len=4, image_vocab_size=8,
                    image_grid=2, conv_kernel=1)


def test_small_config_by_hand():
    p = plan(SMALL, nodes=2, gpus_per_node=2, batch_size_per_gpu=3, powersgd_rank=1,
             activation_checkpointing=True)
    # Parameters.
    #   root: text embedding (16 + 4) x 8 = 160, BOS 8, text positions 4 x 8 = 32, image embedding
    #         8 x 8 = 64, image rows 2 x 8 = 16, columns 16, final LN 16, text head 160, image head 64
    #         = 536
    #   layer: attention LN 16 + qkv 24 x 8 = 192 (+24) + proj 64 (+8) = 304;
    #          MLP LN 16 + fc 32 x 8 = 256 (+32) + proj 8 x 32 = 256 (+8) = 568; 872 a layer
    assert p.n_params_root == 536
    assert p.n_params_layers == 2 * 872
    assert p.n_params == 2280 == count_parameters(SMALL)
    # Every first dimension is even: shards are exact halves, 1140 parameters per GPU.
    assert p.params_per_gpu == 1140
    # Memory (2-byte params and grads, 12 bytes of Adam + master per parameter).
    assert p.mem_params == 1140 * 2 == 2280
    assert p.mem_grads == 2280
    assert p.mem_optimizer == 1140 * 12 == 13680
    # gathered: (root + 2 layers) x 2 bytes + (root + 1 layer) x 2 bytes = 4560 + 2816
    assert p.mem_unsharded == 7376
    # activations, B = 3, S = 4 + 4 = 8, T = 24 tokens, d = 8, h = 2:
    #   checkpointed layer inputs: 2 layers x 24 x 8 x 4 bytes = 1536
    #   one layer's working set: 24 x 8 x (2 x 4 + 14 x 2) = 6912, attention 2 x 3 x 2 x 8^2 x 2 = 1536
    #   logits and their gradient, fp32: 2 x 4 x 3 x (4 x 20 + 4 x 8) = 2688
    assert p.mem_activations == 1536 + 6912 + 1536 + 2688
    assert p.mem_total == 2280 + 2280 + 13680 + 7376 + 12672
    # Inside a machine (g = 2 sends (g-1)/g = 1/2 of each collective's buffer):
    #   all-gather: every parameter in forward (2280) + the layers again in backward (1744), 2 bytes
    assert p.intra_allgather_bytes == (2280 + 1744) * 2 // 2 == 4024
    #   reduce-scatter of all gradients, 2 bytes
    assert p.intra_reduce_scatter_bytes == 2280 * 2 // 2 == 2280
    # Across machines (n = 2: a ring all-reduce sends 2 (n-1)/n = 1 x the buffer):
    assert p.inter_bytes_uncompressed == 1140 * 2
    # PowerSGD at rank 1, compress a shard (a x b) when (a + b) x 1 x 2 < a b, and never the
    # embeddings, heads, gains or biases (the paper, appendix E):
    #   root: all of it uncompressed (embeddings, positions, BOS, final LN, heads): 536 / 2 = 268
    #   layer: LNs 8 + 8, qkv [12, 8] -> 20 (+12 bias), proj [4, 8] -> 12 (+4),
    #          fc [16, 8] -> 24 (+16), MLP proj [4, 32] -> 36 (+4): 144
    sent = 268 + 2 * 144
    assert sent == 556
    assert p.inter_bytes_powersgd == sent * 2
    assert p.compression == pytest.approx(1 - 556 / 1140)
    # Before the exclusions (every compressible matrix compressed): the root sent 104, not 268:
    #   text emb [10, 8] -> 18, text pos [2, 8] 16, image emb [4, 8] -> 12, rows / cols 8 + 8,
    #   heads [10, 8] -> 18 and [4, 8] -> 12, BOS 4 + final LN 8
    every = plan(SMALL, nodes=2, gpus_per_node=2, batch_size_per_gpu=3, powersgd_rank=1,
                 powersgd_exclude_roles=())
    assert every.inter_bytes_powersgd == (104 + 2 * 144) * 2
    # the paper's formula with r = 1 x 2 GPUs, d = 8: 1 - 10 / 64
    assert p.paper_formula_compression == pytest.approx(1 - 10 / 64)
    assert p.inter_bytes == p.inter_bytes_powersgd
    table = p.to_table()
    assert "PowerSGD" in table and "2,280" in table


def test_padding_one_machine_and_no_checkpointing():
    # g = 3 does not divide the first dimensions: FSDP pads dim 0 to a multiple of 3.
    #   root: text emb ceil(20/3) = 7 rows x 8 = 56, BOS 3, text pos 2 x 8 = 16, image emb 3 x 8 = 24,
    #         rows 8, cols 8, final LN 3 + 3, heads 56 + 24: 201
    #   layer: LN 6, qkv 8 x 8 = 64 (+8), proj 3 x 8 = 24 (+3); LN 6, fc 11 x 8 = 88 (+11),
    #          proj 3 x 32 = 96 (+3): 309
    p = plan(SMALL, nodes=1, gpus_per_node=3, batch_size_per_gpu=1, activation_checkpointing=False)
    assert p.params_per_gpu == 201 + 2 * 309
    assert p.inter_bytes_uncompressed == 0 and p.inter_bytes_powersgd is None and p.compression is None
    # without checkpointing every layer keeps its working set: T = 8 tokens
    working = 8 * 8 * (8 + 28) + 2 * 1 * 2 * 64 * 2
    logits = 2 * 4 * 1 * (4 * 20 + 4 * 8)
    assert p.mem_activations == 2 * working + logits


def test_paper_12b():
    p = plan(PAPER_12B, nodes=128, gpus_per_node=8, batch_size_per_gpu=1, powersgd_rank=112)
    # ~12B parameters (the paper: "12-billion parameter"); 64 layers of 12 d^2 + 13 d
    assert p.n_params == count_parameters(PAPER_12B)
    assert 12.2e9 < p.n_params < 12.4e9
    assert p.global_batch == 1024  # the paper's batch: 1 per GPU on 1024 GPUs
    # the paper's ~85% compression, from the actual shard shapes at rank 112 per GPU, with the
    # embeddings, heads, gains and biases sent uncompressed (83.3%; 84.8% if they were compressed:
    # the two embeddings and two heads are 2 x (16640 + 8192) x 3968 = 197M parameters) ...
    assert p.compression == pytest.approx(0.833, abs=0.001)
    every = plan(PAPER_12B, nodes=128, gpus_per_node=8, batch_size_per_gpu=1, powersgd_rank=112,
                 powersgd_exclude_roles=())
    assert every.compression == pytest.approx(0.848, abs=0.001)
    # ... and by its formula with r = 896 = 8 x 112
    assert p.paper_formula_compression == pytest.approx(1 - 5 * 896 / (8 * 3968))
    assert p.paper_formula_compression == pytest.approx(0.86, abs=0.005)
    assert p.inter_bytes_powersgd < 0.17 * p.inter_bytes_uncompressed
    # sharded over 8 GPUs the 16 bytes per parameter of state fit a 32 GB V100
    assert p.mem_total < 32e9
    assert "12,293" in p.to_table()


def test_compression_rule_matches_torch():
    # torch's _should_compress: (rows + cols) * rank * min_rate < rows * cols
    assert should_compress(100, 100, 10, 2.0)  # 2000 x 2 = 4000 < 10000
    assert not should_compress(100, 100, 30, 2.0)  # 6000 x 2 >= 10000
    assert sent_numel((100, 100), 10000, 10) == 2000
    assert sent_numel(None, 7, 10) == 7
    assert sent_numel((100, 100), 10000, None) == 10000
    assert paper_compression(896, 3968) == pytest.approx(0.8589, abs=1e-4)


def test_parameter_roles_decide_what_powersgd_compresses():
    """Only the resblocks' weight matrices are compressed; by name (role), not by shape."""
    from dalle_core.distributed.powersgd import is_compressed, parameter_role
    from dalle_core.prior import DalleTransformer

    with __import__("torch").device("meta"):
        model = DalleTransformer(SMALL)
    roles = {n: parameter_role(n, p.dim() >= 2) for n, p in model.named_parameters()}
    assert {n for n, r in roles.items() if r == "embedding"} == {
        "bos", "text_position", "image_row", "image_col", "text_embedding.weight", "image_embedding.weight"}
    assert {n for n, r in roles.items() if r == "head"} == {"text_head.weight", "image_head.weight"}
    assert roles["ln_f.weight"] == roles["blocks.0.attn.ln.weight"] == "gain"
    assert roles["blocks.1.mlp.mlp.fc.bias"] == "bias"
    assert {n for n, r in roles.items() if r == "matrix"} == {
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.attn.qkv.weight", "attn.attn.proj.weight",
                                                      "mlp.mlp.fc.weight", "mlp.mlp.proj.weight")}
    # a big embedding shard would be worth compressing by shape, but its role says no
    assert should_compress(1000, 100, 4) and not is_compressed("text_embedding.weight", (1000, 100), 4)
    assert is_compressed("text_embedding.weight", (1000, 100), 4, exclude_roles=())
    # FSDP/wrapper names (the per-resblock scaler's "resblock." infix) classify the same
    assert parameter_role("blocks.0.attn.resblock.ln.weight", True) == "gain"


# --- every stage (dalle_core.stage_plan, `dalle plan --gpus ...`) ----------------------------------------------

PAPER = get_profile("paper-12B")


@pytest.fixture(scope="module")
def paper_dvae_cost():
    from dalle_core.stage_plan import dvae_cost

    return dvae_cost(PAPER.dvae)


def test_data_stage_by_hand(tmp_path):
    import numpy as np

    from dalle_core.data.codes import CodedPair, write_code_shard
    from dalle_core.stage_plan import plan_data
    from dalle_core.storage import LocalStorage

    d = plan_data(PAPER.data, 256, 32, 1000, fetch_success=0.5, filter_keep=0.8, crawl_cpu_ms_per_pair=4.0,
                  filter_cpu_ms_per_pair=1.3, pods=2, cores_per_pod=4, jpeg_bytes=1000, caption_bytes=60,
                  meta_bytes=300)
    # 1000 kept of 1250 downloaded (80%) of 2500 URLs (50%)
    assert (d["downloaded"], d["urls"]) == (1250, 2500)
    # CPU per downloaded pair: 1250 x 4 ms = 5 s of crawl, 1250 x 1.3 ms = 1.625 s of filters; 8 cores
    assert d["crawl_core_hours"] == pytest.approx(5 / 3600)
    assert d["filter_core_hours"] == pytest.approx(1.625 / 3600)
    assert d["crawl_pod_hours"] == pytest.approx(5 / 3600 / 4)
    assert d["crawl_wall_s"] == pytest.approx(5 / 8) and d["filter_wall_s"] == pytest.approx(1.625 / 8)
    assert d["shards"] == 1  # 10,000 pairs a shard
    # tar members: 512-byte header + data padded to 512 (no PAX header: our writers' mtime is an int).
    # Image shards: jpg 1000 -> 1536, caption 60 -> 1024, json 300 -> 1024. Codes: codes.npy 128-byte
    # header + 32 x 32 int16 = 2176 -> 3072, text.npy 128 + 256 int32 = 1152 -> 2048, caption, json 1024
    assert d["shard_bytes_per_pair"] == 1536 + 1024 + 1024 == 3584
    assert d["code_bytes_per_pair"] == 3072 + 2048 + 1024 + 1024 == 7168
    assert d["shard_bytes"] == 1000 * 3584 and d["raw_bytes"] == 1250 * 3584
    assert d["code_bytes"] == 1000 * 7168
    assert d["total_bytes"] == 1000 * 3584 + 1250 * 3584 + 1000 * 7168
    # members written with a float mtime (before 2026-12-01) carry a 1 KiB PAX header each: 11264 a pair
    assert plan_data(PAPER.data, 256, 32, 1000, pax=True, caption_bytes=60, meta_bytes=300)[
        "code_bytes_per_pair"] == 4096 + 3072 + 2048 + 2048 == 11264
    # ... and a code shard written by the encoder's writer has exactly the planned size per pair (+ the
    # tar's end: two zero blocks, the file padded to 20-block records): no PAX headers
    n = 10
    pairs = [CodedPair(key=f"k{i:03d}", caption="x" * 60, text=np.zeros(256, np.int32),
                       codes=np.zeros((32, 32), np.int16), meta={"i": i, "pad": "y" * 250}) for i in range(n)]
    info = write_code_shard(pairs, LocalStorage(tmp_path), "codes/000000.tar")
    assert info.bytes == -(-(n * 7168 + 1024) // 10240) * 10240


def test_paper_data_stage():
    from dalle_core.stage_plan import plan_data

    d = plan_data(PAPER.data, 256, 32)  # the defaults: 250M pairs, measured rates, stated assumptions
    assert d["shards"] == 25_000 and d["downloaded"] == 312_500_000
    assert d["crawl_core_hours"] == pytest.approx(312.5e6 * 4e-3 / 3600)  # 347 core-hours
    assert d["code_bytes"] == 250_000_000 * 7168  # 1.79 TB of codes (2.82 TB with the PAX headers of before)


def test_dvae_flops_by_hand(paper_dvae_cost):
    c = paper_dvae_cost

    def conv(k, cin, cout, side):
        return 2 * k * k * cin * cout * side * side

    # encoder: 7x7 input conv, 4 groups of 2 bottleneck blocks (3x3, 3x3, 3x3, 1x1 at width / 4, a 1x1
    # id path where the width changes), max-pool between groups, 1x1 to the 8192 logits at 32 x 32
    enc, width = conv(7, 3, 256, 256), 256
    for g in range(4):
        side, out = 256 >> g, 256 << g
        for i in range(2):
            cin = width if i == 0 else out
            enc += conv(3, cin, out // 4, side) + 2 * conv(3, out // 4, out // 4, side) + conv(1, out // 4, out, side)
            enc += conv(1, cin, out, side) if cin != out else 0
        width = out
    enc += conv(1, 2048, 8192, 32)
    assert c.encode_flops == enc == 272_294_215_680
    # training: forward + backward (input and weight gradients) of every conv, 3x, except the input
    # conv, whose input (the image) needs no gradient
    assert c.train_flops == 3 * (c.encode_flops + c.decode_flops) - conv(7, 3, 256, 256)
    assert c.encoder_params + c.decoder_params == 97_616_006


def test_stage_times_by_hand(paper_dvae_cost):
    from dalle_core.prior.sampling_memory import kv_cache_bytes_per_row
    from dalle_core.stage_plan import GPUS, plan_stages

    s = plan_stages(PAPER, 1024, "H100", powersgd_rank=112, dvae_cost_=paper_dvae_cost)
    F, u, c = 989e12, 0.30, paper_dvae_cost
    assert GPUS["H100"].peak_flops == F
    # encode: 250M images x 272.3 GFLOP on 1,024 GPUs
    assert s.encode["time_s"] == pytest.approx(250e6 * c.encode_flops / (1024 * F * u))
    # dVAE: batch 512 on 64 GPUs (8 each), 3M updates; fp32 weights, grads, Adam, EMA + 8 images' activations
    assert s.dvae["step_s"] == pytest.approx(512 * c.train_flops / (64 * F * u))
    assert s.dvae["time_s"] == pytest.approx(3_000_000 * s.dvae["step_s"])
    assert s.dvae["memory_per_gpu_bytes"] == 97_616_006 * 20 + 8 * c.saved_bytes
    # prior: 6 x 64 x (12 d^2 + 13 d) + 12 x 64 x 1280 x d FLOPs a token, 430k x 1024 x 1280 tokens
    d = 3968
    fpt = 6 * 64 * (12 * d * d + 13 * d) + 12 * 64 * 1280 * d
    assert s.prior["flops_per_token"] == fpt == pytest.approx(76.5e9, rel=1e-3)
    hours = 430_000 * 1024 * 1280 * fpt / (1024 * F * u) / 3600
    assert s.prior["time_s"] / 3600 == pytest.approx(hours) == pytest.approx(39.4, abs=0.05)
    assert s.prior["batch_per_gpu"] == 1 and s.prior["nodes"] == 128
    # sampling: 36 rows on an 80 GiB GPU; a step reads the bf16 weights and 36 KV caches of mean
    # length 256 + 512 = 768 of 1280 positions, at 3.35 TB/s (memory-bound)
    kv = kv_cache_bytes_per_row(PAPER.prior)
    step_bytes = 2 * 12_293_828_224 + 36 * kv * 768 / 1280
    assert s.sampling["batch"] == 36 and s.sampling["bound"] == "memory"
    assert s.sampling["step_s"] == pytest.approx(step_bytes / 3.35e12)
    rate = 36 / (1024 * step_bytes / 3.35e12)
    assert s.sampling["images_per_gpu_s"] == pytest.approx(rate)
    assert s.sampling["eval_time_s"] == pytest.approx(30_000 * 512 / (1024 * rate))
    # the paper's V100s: 8x less peak; the prior takes ~8x longer (13 days at 30%)
    v = plan_stages(PAPER, 1024, "V100", powersgd_rank=112, dvae_cost_=paper_dvae_cost)
    assert v.prior["time_s"] == pytest.approx(s.prior["time_s"] * 989 / 125)


def test_cli_plans_every_stage(capsys):
    from orchestration.cli import main

    assert main(["plan", "--profile", "paper-12B", "--gpus", "1024", "--powersgd-rank", "112"]) == 0
    out = capsys.readouterr().out
    assert "128 machines x 8 GPUs, batch 1/GPU (1024 global)" in out
    for line in ("data: crawl CPU", "data: filter CPU", "data: storage", "encode: dVAE encoder", "dVAE: step",
                 "dVAE: memory per GPU", "prior: time", "sampling: zero-shot eval", "device: peak", "host: init chunk"):
        assert line in out, line
    assert "25,000 of 10,000 pairs" in out and "39.4 h" in out and "40.53 GiB" in out
    assert main(["plan", "--gpus", "1020"]) == 2  # not whole machines of 8
    assert main(["plan", "--gpus", "16", "--nodes", "3"]) == 2
    assert "--gpus" in capsys.readouterr().err
