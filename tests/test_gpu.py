"""Every path on a CUDA GPU (`make test-gpu` = `pytest -m gpu`; skipped where torch.cuda.is_available() is false).

What runs here: CUDA logits (fp32 and bf16) against CPU fp32; 30 training steps of `tiny` on CUDA against
CPU fp32; the native FP8 GEMMs (dense and grouped, all three GEMMs, odd padded shapes) against the
emulation within fp8_gemm.agreement_bound; FP8 training on CUDA against emulated FP8; greedy, sampled and
speculative decoding and continuous batching on CUDA; the OpenAI server on CUDA (a real process, the real
openai client); a checkpoint written by a CUDA run loading on the CPU with equal logits. The loss gap of
200 FP8 steps and all speeds are in benchmarks/bench_gpu.py and bench_fp8.py (scripts/gpu_check.sh).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import nanoseek
from conftest import SERVER_API_KEY
from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.sampling import sample
from nanoseek.model import Transformer
from nanoseek.model.moe import GroupedExperts
from nanoseek.train import fp8_gemm
from nanoseek.train.fp8 import FP8Options, enable_fp8, fp8_linear, quantize_blocks, quantize_tiles

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def _ids(B=2, T=48, vocab=512, seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- logits
def test_cuda_logits_match_cpu_fp32(tiny):
    ids = _ids()
    with torch.no_grad():
        ref = tiny(ids)
        fp32 = copy.deepcopy(tiny).to(CUDA)(ids.to(CUDA)).cpu()
        bf16 = copy.deepcopy(tiny).cast(torch.bfloat16).to(CUDA)(ids.to(CUDA)).float().cpu()
    assert _rel(fp32, ref) < 1e-4  # the same math: only summation order differs
    assert _rel(bf16, ref) < 3e-2  # bf16 weights and activations: ~2^-8 per rounding, a few layers deep
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


# ----------------------------------------------------------------------------- training
def _train(tmp: Path, name: str, *sets: str) -> tuple[list[float], Path]:
    from nanoseek.train.config import load_run_config
    from nanoseek.train.loop import train

    cfg = load_run_config(ROOT / "configs" / "tiny.toml", ["train.save_every=0", "train.log_every=1", *sets])
    final = train(cfg, tmp / name, progress=False)
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r], final


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("train"), "cpu", "train.device=cpu", "train.dtype=fp32")


def test_30_steps_of_tiny_on_cuda_track_cpu_fp32(cpu_run, tmp_path):
    ref, _ = cpu_run
    fp32, _ = _train(tmp_path, "cuda32", "train.device=cuda", "train.dtype=fp32")
    bf16, _ = _train(tmp_path, "cuda16", "train.device=cuda", "train.dtype=bf16")
    assert len(ref) == len(fp32) == len(bf16) == 30
    assert fp32[0] == pytest.approx(ref[0], rel=1e-4)
    assert max(abs(a - b) / b for a, b in zip(fp32, ref)) < 1e-2
    assert bf16[0] == pytest.approx(ref[0], rel=1e-2)
    assert bf16[-1] == pytest.approx(ref[-1], rel=5e-2) and bf16[-1] < bf16[0] - 0.5


def test_checkpoint_from_a_cuda_run_loads_on_cpu_with_equal_logits(tmp_path):
    _, final = _train(tmp_path, "ckpt", "train.device=cuda", "train.dtype=bf16", "train.steps=5")
    on_cpu, on_cuda = nanoseek.load(final), nanoseek.load(final, device="cuda")
    assert next(on_cpu.parameters()).device.type == "cpu"
    ids = _ids(vocab=on_cpu.config.vocab_size)
    with torch.no_grad():
        assert _rel(on_cuda(ids.to(CUDA)).cpu(), on_cpu(ids)) < 1e-4


# ----------------------------------------------------------------------------- FP8
def test_auto_backend_is_blockwise_on_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the blockwise FP8 kernels are SM90-only; this GPU falls back to the emulation")
    assert fp8_gemm.blockwise_available(CUDA) is None
    assert fp8_gemm.resolve("auto", 128, CUDA) == "blockwise"


def _hopper_or_skip():
    why = fp8_gemm.blockwise_available(CUDA)
    if why:
        pytest.skip(why)


def _within_bound(got, ref, a, b):
    """|got - ref| <= agreement_bound for out = a @ b^T (a, b the dequantized operands), elementwise."""
    bound = fp8_gemm.agreement_bound(a.float(), b.float())
    excess = ((got.float() - ref.float()).abs() - bound).max().item()
    assert excess <= 0, f"blockwise exceeds the bound by {excess:g} (relative error {_rel(got, ref):.2e})"


def _wide(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-2, 2, shape[-2])[:, None]
    return x.to(CUDA)


@pytest.mark.parametrize("M,K,N", [(256, 512, 384), (7, 200, 40), (130, 1280, 576), (1, 64, 16)])
def test_fp8_linear_three_gemms_blockwise_vs_emulation(M, K, N):
    _hopper_or_skip()
    x, w, dy = _wide(M, K, seed=1), _wide(N, K, seed=2) * 0.05, _wide(M, N, seed=3)
    res = {}
    for backend in ("blockwise", "emulate"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, FP8Options(backend=backend))
        y.backward(dy)
        res[backend] = (y.detach(), xr.grad, wr.grad)
    (y, dx, dw), (y0, dx0, dw0) = res["blockwise"], res["emulate"]
    deq_t = lambda t: fp8_gemm.dequantize_tiles(*quantize_tiles(t))  # noqa: E731
    w_deq = fp8_gemm.dequantize_blocks(*quantize_blocks(w))
    _within_bound(y, y0, deq_t(x), w_deq)                      # forward: x @ W^T
    _within_bound(dx, dx0, deq_t(dy), w_deq.t())               # dgrad: dy @ W
    _within_bound(dw, dw0, deq_t(dy.t()), deq_t(x.t()))        # wgrad: dy^T @ x, tiles along tokens


def test_fp8_grouped_experts_blockwise_vs_emulation():
    _hopper_or_skip()
    torch.manual_seed(4)
    cfg = preset("small")
    ex = GroupedExperts(cfg).to(CUDA)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    counts = torch.tensor([0, 3, 130, 17, 1, 64, 9, 2, 40, 0, 5, 11, 7, 200, 1, 6], device=CUDA)
    x = torch.randn(int(counts.sum()), cfg.hidden_size, device=CUDA)
    dy = torch.randn_like(x)
    res = {}
    for backend in ("blockwise", "emulate"):
        m = copy.deepcopy(ex)
        enable_fp8(torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"experts": m})}),
                   FP8Options(backend=backend))
        xr = x.clone().requires_grad_()
        y = m(xr, counts)
        y.backward(dy)
        res[backend] = (y.detach(), xr.grad, m.gate_up_proj.grad, m.down_proj.grad)
    # Two chained GEMMs: the first GEMM's tiny differences are re-quantized, so compare norm-wise at the bound's
    # scale rather than element by element.
    for got, ref in zip(res["blockwise"], res["emulate"]):
        assert _rel(got, ref) < 2 * fp8_gemm.RECIPE_BLOCK * 2.0 ** -fp8_gemm.ACCUMULATOR_BITS


def test_fp8_training_on_cuda_tracks_emulated_fp8(tmp_path):
    _hopper_or_skip()
    emu, _ = _train(tmp_path, "emu", "train.device=cuda", "train.dtype=bf16", "fp8.enabled=true",
                    "fp8.backend=emulate", "train.steps=15")
    native, _ = _train(tmp_path, "native", "train.device=cuda", "train.dtype=bf16", "fp8.enabled=true",
                       "fp8.backend=blockwise", "train.steps=15")
    assert native[0] == pytest.approx(emu[0], rel=1e-3)
    assert max(abs(a - b) / b for a, b in zip(native, emu)) < 2e-2


# ----------------------------------------------------------------------------- decoding
def _greedy_reference(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=CUDA))[0, -1].argmax()))
    return seq[len(prompt):]


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_cuda(tiny):
    return copy.deepcopy(tiny).to(CUDA)


def test_greedy_and_continuous_batching_on_cuda(tiny_cuda):
    prompts = _prompts([3, 9, 17, 5, 30])
    sp = [SamplingParams(max_tokens=n) for n in (12, 5, 9, 14, 3)]
    out = Engine(tiny_cuda, max_batch_size=2, max_len=64).generate_batch(prompts, sp)  # 5 requests, 2 slots
    for p, s, c in zip(prompts, sp, out):
        assert c.token_ids == _greedy_reference(tiny_cuda, p, s.max_tokens)


def test_sampled_decoding_on_cuda_reproduces_and_matches_cpu(tiny, tiny_cuda):
    prompts = _prompts([4] * 32, seed=2)
    mk = lambda i: SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, top_k=50, seed=100 + i,  # noqa: E731
                                  logprobs=True)
    run = lambda m, B: Engine(m, max_batch_size=B, max_len=16).generate_batch(  # noqa: E731
        prompts, [mk(i) for i in range(len(prompts))])
    a, b = run(tiny_cuda, 32), run(tiny_cuda, 5)  # another batch composition: the same tokens
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.logprobs) == 6 and all(lp <= 0 for lp in c.logprobs) for c in a)
    # A seed's uniforms come from a CPU generator: the first token (the prefill's draw) is the one the CPU draws
    # from the same logits, unless fp32 rounding moves a CDF boundary across the uniform.
    with torch.no_grad():
        cpu_first = [int(sample(tiny(torch.tensor([p]))[:, -1], [mk(i)], [mk(i).make_generator()])[0])
                     for i, p in enumerate(prompts)]
    assert sum(c.token_ids[0] == t for c, t in zip(a, cpu_first)) >= 30


def test_speculative_decoding_on_cuda(tiny_cuda):
    prompts = _prompts([5, 13, 8, 1])
    greedy = SamplingParams(max_tokens=20)
    plain = Engine(tiny_cuda, max_batch_size=4, max_len=64).generate_batch(prompts, greedy)
    spec = Engine(tiny_cuda, max_batch_size=4, max_len=64, speculative=True)
    assert [c.token_ids for c in spec.generate_batch(prompts, greedy)] == [c.token_ids for c in plain]
    assert spec.stats.drafted > 0
    sampled = [SamplingParams(max_tokens=20, temperature=0.8, seed=i, logprobs=True) for i in range(4)]
    first = [c.token_ids for c in Engine(tiny_cuda, max_batch_size=4, max_len=64, speculative=True)
             .generate_batch(prompts, sampled)]
    again = [c.token_ids for c in Engine(tiny_cuda, max_batch_size=2, max_len=64, speculative=True)
             .generate_batch(prompts, sampled)]
    assert first == again and all(len(t) == 20 for t in first)


def test_bf16_engine_on_cuda(tiny):
    model = copy.deepcopy(tiny).cast(torch.bfloat16).to(CUDA)
    engine = Engine(model, max_batch_size=4, max_len=64)
    assert engine.cache.dtype == torch.bfloat16 and engine.cache.device.type == "cuda"
    out = engine.generate_batch(_prompts([6, 2, 11]), SamplingParams(max_tokens=10, temperature=0.7, seed=1))
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out)


# ----------------------------------------------------------------------------- SFT and GRPO
def test_sft_and_grpo_steps_on_cuda(tmp_path):
    import json as _json
    import random

    from nanoseek.data.tasks import load_jsonl_task
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.data.chat import encode_sft
    from nanoseek.rl.sft import SFTConfig, completion_loss, sft_train
    from nanoseek.rl.trainer import GRPOConfig, GRPOTrainer

    prompts = [f"pick {w}" for w in "abcdefgh"]
    rows = [{"prompt": p, "answer": "7", "solution": "ok", "checker": "exact", "split": "train"} for p in prompts]
    (tmp_path / "seven.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    task = load_jsonl_task(tmp_path / "seven.jsonl")
    tok = train_tokenizer(prompts + ["ok 0 1 2 3 4 5 6 7 8 9"] * 20, 300, tmp_path / "tok", min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64)).to(CUDA)
    rng = random.Random(0)
    pairs = [encode_sft(p, "ok", str(rng.randrange(10)), tok) for p in prompts for _ in range(4)]
    before = completion_loss(model, pairs, tok.pad_id)
    sft_train(model, pairs, SFTConfig(steps=20, batch_size=16, lr=1e-2, warmup_steps=2, mtp_weight=0.0),
              tok.pad_id, progress=False)
    assert completion_loss(model, pairs, tok.pad_id) < before
    cfg = GRPOConfig(task="seven", steps=2, prompts_per_step=4, G=4, lr=1e-3, max_new_tokens=8, beta=0.001, seed=0)
    hist = GRPOTrainer(model, tok, cfg, progress=False, task=task).train()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert next(model.parameters()).device.type == "cuda"


# ----------------------------------------------------------------------------- the server
def test_openai_server_on_cuda(chat_model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import CHAT_ANSWER, running_server

    with running_server(chat_model_dir, tmp_path / "server.log", "--model-name", "tiny-gpu", "--device", "cuda",
                        "--max-batch-size", "4", "--log-level", "warning", start_timeout=180) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=60)
        hi = [{"role": "user", "content": "Hi"}]
        r = client.chat.completions.create(model="tiny-gpu", messages=hi, temperature=0)
        assert r.choices[0].message.content == CHAT_ANSWER and r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="tiny-gpu", messages=hi, temperature=0.7, seed=3,
                                                     stream=True, max_tokens=12))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- distributed on CUDA (NCCL)
def test_bf16_on_cuda_gives_fsdp2_mixed_precision():
    """train.dtype = "auto" resolves to bf16 on CUDA, and parallelize() turns that into FSDP2's policy:
    bf16 parameters and compute, fp32 gradient reduction; the routers' policy keeps them fp32."""
    from types import SimpleNamespace

    from nanoseek.train.parallel import Dist, _param_dtype, mixed_precision_policies

    dtype = _param_dtype(SimpleNamespace(train=SimpleNamespace(dtype="auto")), Dist(device=CUDA))
    assert dtype == torch.bfloat16
    model_mp, router_mp = mixed_precision_policies(dtype)
    assert (model_mp.param_dtype, model_mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (router_mp.param_dtype, router_mp.reduce_dtype) == (torch.float32, torch.float32)


def test_ep_dispatch_over_nccl_on_one_gpu(tmp_path):
    """The EP all-to-all (counts and rows, device tensors) through NCCL in a one-rank group, with and without
    redundant experts: the same output and gradients as the plain MoE on the GPU."""
    import torch.distributed as tdist

    from nanoseek.model.moe import MoE
    from nanoseek.train.expert_replicas import ExpertReplicas
    from nanoseek.train.parallel import shard_experts

    tdist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = preset("tiny")
        ref = MoE(cfg).to(CUDA)
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 16, cfg.hidden_size, device=CUDA)
        y_ref, _ = ref(x)
        y_ref.square().sum().backward()
        for redundant in (0, 2):
            moe = copy.deepcopy(ref)
            moe.zero_grad(set_to_none=True)
            reps = ExpertReplicas([moe], {}, 1, 0, redundant, 0, CUDA) if redundant else None
            shard_experts([moe], tdist.group.WORLD, 1, 0, reps)
            y, _ = moe(x)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
            y.square().sum().backward()
            g = moe.experts.down_proj.grad
            if reps is not None:  # fold the replicas' gradients back onto the logical experts
                g = torch.zeros_like(ref.experts.down_proj).index_add_(0, reps.local_experts(0), g)
            torch.testing.assert_close(g, ref.experts.down_proj.grad, rtol=1e-5, atol=1e-6)
    finally:
        tdist.destroy_process_group()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")


@two_gpus
def test_bf16_fsdp_and_ep_over_nccl_track_one_gpu(tmp_path):
    """torchrun, 2 ranks on 2 GPUs over NCCL: FSDP2 mixed precision with EP=2 against one bf16 GPU process."""
    from test_parallel import _worker

    r, _ = _worker(tmp_path, "bf16_one", 1, "--bf16")
    g, _ = _worker(tmp_path, "bf16_ep2", 2, "--ep", "2", "--bf16")
    assert g["compute_dtypes"] == ["torch.bfloat16"] and g["param_dtypes"] == ["torch.float32"]
    for key, rel in (("loss", 1e-3), ("mtp_loss", 1e-3), ("grad_norm", 2e-2)):
        assert g[key] == pytest.approx(r[key], rel=rel), key


@two_gpus
def test_redundant_experts_over_nccl_match_one_gpu(tmp_path):
    from test_parallel import REPLICAS, _worker

    r, rs = _worker(tmp_path, "fp32_one", 1)
    g, gs = _worker(tmp_path, "fp32_ep2_red", 2, "--ep", "2", *REPLICAS)
    assert g["replica_divergence"] == 0.0 and g["rebalances"] == 2
    for key in ("loss", "mtp_loss", "grad_norm"):
        assert g[key] == pytest.approx(r[key], rel=1e-5), key
    for k in (k for k in rs if k.startswith("grad/")):
        torch.testing.assert_close(gs[k], rs[k], rtol=1e-4, atol=1e-5, msg=k)
