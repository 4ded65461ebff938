"""GRPOTrainer.update's shortcuts compute the loss and gradient of the plain GRPO update.

The plain update (written out below, as the trainer's docstring states it): one right-padded batch of
every row, logits over every position through model(ids), the old-policy log-probabilities from a
separate forward before any optimizer step, the reference's from model(ids) as well, then mu passes of
`minibatches` optimizer steps on grpo_loss. The trainer instead takes the old log-probabilities of an
untouched minibatch from its own first forward, runs rows in length buckets padded to their own longest
row, and scores only completion positions through nanoseek.train.head. Both sides run the real
TrainStep from the same weights (with SGD, so that weights after several steps stay comparable); every
optimizer step's gradient, the logged statistics and the final weights must agree.
"""

import copy
import random

import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer
from nanoseek.rl import grpo, packed
from nanoseek.rl.trainer import GRPOConfig, GRPOTrainer, Rollouts, completion_log_probs, reference_log_probs
from nanoseek.train.optim import OptimConfig
from nanoseek.train.step import TrainStep


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus(200, seed=0), 300)


def _rollouts(trainer: GRPOTrainer, seed: int) -> Rollouts:
    """Real prompts of the task; completions of two very different lengths (so the update buckets them)
    with random non-special tokens, and random rewards."""
    cfg, tok = trainer.cfg, trainer.tok
    rng = random.Random(seed)
    examples = trainer.problems(0)
    from nanoseek.data.chat import render_prompt

    prompts = [render_prompt(ex.prompt, tok) for ex in examples for _ in range(cfg.G)]
    lengths = [rng.choice([2, 3, 4]) if i % 2 else rng.choice([18, 20, 22]) for i in range(len(prompts))]
    completions = [[rng.randrange(8, tok.vocab_size) for _ in range(n)] for n in lengths]
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in prompts])
    B = len(prompts)
    return Rollouts(examples, prompts, completions, [""] * B, [False] * B, rewards, [0.0] * B, [0.0] * B, 0.0)


def _plain_update(model, reference, stepper, ro, cfg, pad_id):
    """The update without shortcuts; returns each optimizer step's metrics."""
    ids, targets, mask = grpo.completion_batch(ro.prompts, ro.completions, pad_id)
    adv = grpo.group_advantages(ro.rewards, cfg.G)
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref = grpo.token_log_probs(reference(ids), targets)
    model.train()
    old = grpo.token_log_probs(model(ids), targets).detach()  # before any step: the sampling policy
    mb = ids.shape[0] // cfg.minibatches
    recs = []
    for _ in range(cfg.mu):
        for k in range(cfg.minibatches):
            sl = slice(k * mb, (k + 1) * mb)

            def loss_fn(sl):
                logp = grpo.token_log_probs(model(ids[sl]), targets[sl])
                loss, st = grpo.grpo_loss(logp, old[sl], adv[sl], mask[sl], ref_logp=None if ref is None else ref[sl],
                                          clip_eps=cfg.clip_eps, beta=cfg.beta, aggregation=cfg.aggregation)
                return loss, {"loss": st.loss, "kl": st.kl, "clip_frac": st.clip_fraction, "ratio": st.ratio_mean}

            recs.append(stepper(0, [sl], loss_fn))
    model.eval()
    return recs


def _record_grads(opt) -> list[list[torch.Tensor]]:
    grads: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, *_: grads.append(
        [p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None]))
    return grads


def _count_forwards(model) -> list[int]:
    """Forwards of the model, packed or padded: both run the first layer's kv_a projection once per forward."""
    calls = [0]
    model.layers[0].self_attn.kv_a_proj_with_mqa.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("path", ["packed", "buckets"])
@pytest.mark.parametrize("mu,minibatches,aggregation,beta", [
    (1, 1, "token", 0.001),    # on-policy: no old-policy forward, rho = 1
    (1, 1, "sequence", 0.0),   # the paper's aggregation, no reference model
    (2, 2, "token", 0.05),     # off-policy minibatches (clipping acts), a second pass
    (2, 1, "sequence", 0.01),  # a second pass over the only minibatch: old = its first forward
])
def test_update_matches_the_plain_update(tok, monkeypatch, mu, minibatches, aggregation, beta, path):
    """packed: each group's prompt once, no padding (nanoseek.rl.packed); buckets: the padded fallback for
    models packing does not cover."""
    if path == "buckets":
        monkeypatch.setattr(packed, "supports", lambda model: False)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    cfg = GRPOConfig(task="arithmetic", prompts_per_step=4, G=4, mu=mu, minibatches=minibatches, beta=beta,
                     aggregation=aggregation, clip_eps=0.01, lr=0.3, grad_clip=0.0, max_new_tokens=24)
    plain, start = copy.deepcopy(model), copy.deepcopy(model)
    tr = GRPOTrainer(model, tok, cfg, progress=False)
    ro = _rollouts(tr, seed=mu * 10 + minibatches)
    for p in plain.mtp.parameters():
        p.requires_grad_(False)
    plain_step = TrainStep(plain, OptimConfig.of(cfg), name="plain")  # after freezing MTP, as the trainer does
    # Plain SGD on both sides: AdamW's first step moves every weight by about lr whatever its gradient's size,
    # which would turn rounding-level gradient differences into lr-sized weight differences.
    for st in (tr.stepper, plain_step):
        st.opt = torch.optim.SGD(st.params, lr=cfg.lr)
    ours_grads, plain_grads = _record_grads(tr.stepper.opt), _record_grads(plain_step.opt)
    forwards = _count_forwards(model)

    rec = tr.update(ro, 0)
    plain_recs = _plain_update(plain, tr.reference, plain_step, ro, cfg, tok.pad_id)

    n_steps = mu * minibatches
    assert len(ours_grads) == len(plain_grads) == n_steps
    for step, (a, b) in enumerate(zip(ours_grads, plain_grads)):
        assert len(a) == len(b)
        for ga, gb in zip(a, b):
            assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7), f"optimizer step {step}"
    for key in ("loss", "kl", "clip_frac", "ratio"):
        assert rec[key] == pytest.approx(sum(r[key] for r in plain_recs) / n_steps, rel=1e-4, abs=1e-7), key
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))  # it did train
    # Packed: one forward per minibatch. Buckets: two per optimizer step (one when a minibatch is too small to
    # split: under 2 x 8 rows). The old-policy forward only for the minibatches after the first.
    buckets = 2 if path == "buckets" and len(ro.prompts) // minibatches >= 16 else 1
    assert forwards[0] == buckets * (n_steps + (minibatches - 1))
    if minibatches > 1:
        assert rec["clip_frac"] > 0  # the comparison covers clipping
    if n_steps == 1:
        assert rec["ratio"] == pytest.approx(1.0, abs=1e-6) and rec["clip_frac"] == 0.0


def test_completion_log_probs_match_full_logits_and_reference_needs_a_frozen_model(tok):
    torch.manual_seed(1)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size)).train()
    ids = torch.randint(8, tok.vocab_size, (3, 12))
    targets = torch.randint(8, tok.vocab_size, (3, 12))
    mask = torch.zeros(3, 12)
    mask[0, 4:] = mask[1, 2:9] = mask[2, 11] = 1
    got = completion_log_probs(model, ids, targets, mask)
    want = grpo.token_log_probs(model(ids), targets) * mask
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[mask == 0] == 0).all()
    g1 = torch.autograd.grad(got.sum(), model.lm_head.weight)[0]
    g2 = torch.autograd.grad(want.sum(), model.lm_head.weight)[0]
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        reference_log_probs(model, ids, targets, mask)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    out = reference_log_probs(frozen, ids, targets, mask)
    assert not out.requires_grad
    assert torch.allclose(out, want.detach(), rtol=1e-5, atol=1e-6)


def test_length_buckets_partition_the_rows_and_only_split_when_it_pays():
    lengths = [10] * 20 + [70] * 20
    random.Random(0).shuffle(lengths)
    buckets = grpo.length_buckets(lengths, max_buckets=4, min_rows=8)
    assert sorted(i for b in buckets for i in b) == list(range(40))
    assert len(buckets) == 2 and all(len(b) >= 8 for b in buckets)
    assert {lengths[i] for i in buckets[0]} == {10} and {lengths[i] for i in buckets[1]} == {70}
    # Nearly equal lengths: splitting saves under min_saving, so one bucket in the original order.
    assert grpo.length_buckets([60 + i % 3 for i in range(40)]) == [list(range(40))]
    # Too few rows for two buckets of min_rows.
    assert grpo.length_buckets([5, 90] * 7, min_rows=8) == [list(range(14))]
    # The chosen split is optimal: no other split into two contiguous sorted buckets pads fewer positions.
    ls = [3, 5, 8, 13, 21, 34, 55, 89] * 3
    b = grpo.length_buckets(ls, max_buckets=2, min_rows=4, min_saving=0.0)
    cost = sum(len(x) * max(ls[i] for i in x) for x in b)
    srt = sorted(ls)
    best = min(i * srt[i - 1] + (len(ls) - i) * srt[-1] for i in range(4, len(ls) - 3))
    assert cost <= best


def test_whole_makes_the_parts_add_up_to_the_whole():
    torch.manual_seed(2)
    x = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[4] = 0  # a sequence without tokens
    whole = grpo.Whole.of(mask)
    for how in ("token", "sequence"):
        parts = grpo.aggregate(x[:2], mask[:2], how, whole) + grpo.aggregate(x[2:], mask[2:], how, whole)
        assert parts.item() == pytest.approx(grpo.aggregate(x, mask, how).item(), rel=1e-6)


def test_trainstep_sums_shares_when_not_averaging():
    torch.manual_seed(3)
    lin = torch.nn.Linear(4, 1)
    model = torch.nn.Module()
    model.lin = lin
    model.moe_layers = lambda: []
    model.reset_load = lambda: None
    x = torch.randn(6, 4)
    cfg = OptimConfig(lr=0.0, steps=1, grad_clip=0.0)
    st = TrainStep(model, cfg)
    grads = _record_grads(st.opt)
    rec = st(0, [slice(0, 2), slice(2, 6)], lambda sl: ((lin(x[sl]).sum() / 6), {"m": torch.tensor(float(sl.stop - sl.start))}),
             average=False)
    assert rec["m"] == 6.0
    ref = torch.autograd.grad(lin(x).sum() / 6, lin.weight)[0]
    assert torch.allclose(grads[0][0], ref, atol=1e-6)


def test_packed_log_probs_match_the_padded_forward_and_its_gradients():
    """Groups of equal consecutive prompts of different lengths, completions of 0, 1, 2 and more tokens, a
    prompt that comes back later (its own group): values and every weight's gradient agree with
    completion_log_probs on the right-padded batch, in training mode and for a frozen model under inference
    mode; the packing computes each group's prompt once and no padding."""
    torch.manual_seed(4)
    model = Transformer(preset("tiny", vocab_size=300)).train()
    assert packed.supports(model)
    rng = random.Random(4)
    prompts, completions = [], []
    shared = [rng.randrange(8, 300) for _ in range(5)]
    for p in ([rng.randrange(8, 300) for _ in range(n)] for n in (3, 8)):
        for _ in range(4):
            prompts.append(p)
            completions.append([rng.randrange(8, 300) for _ in range(rng.choice([0, 1, 2, 5, 11]))])
    for c in ([7, 9, 11], [12]):  # a prompt seen before, not adjacent to its earlier rows
        prompts += [shared, prompts[0]]
        completions += [c, list(c) + [13]]
    ids, targets, mask = grpo.completion_batch(prompts, completions, 0)
    pk = packed.Packing.of(prompts, completions)
    n_groups = sum(1 for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1])
    assert pk.prompt_lens.numel() == n_groups
    assert pk.ids.numel() == sum(pk.prompt_lens.tolist()) + sum(max(len(c) - 1, 0) for c in completions)
    want = completion_log_probs(model, ids, targets, mask)
    got = packed.packed_log_probs(model, pk)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[mask == 0] == 0).all()
    w = torch.randn(want.shape)  # a generic linear function of the log-probabilities
    params = [p for p in model.parameters() if p.requires_grad]
    g_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), g_want, g_got):
        if a is None:
            assert b is None or not b.any(), name
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.inference_mode():
        ref = packed.packed_log_probs(frozen, pk)
    assert torch.allclose(ref, reference_log_probs(frozen, ids, targets, mask), rtol=1e-5, atol=1e-6)


def test_packing_refuses_bad_batches_and_sparse_attention_models():
    with pytest.raises(ValueError, match="prompts but"):
        packed.Packing.of([[1, 2]], [])
    with pytest.raises(ValueError, match="at least one token"):
        packed.Packing.of([[]], [[3]])
    # V3.2's sparse attention picks keys per query over the padded row: the padded path scores it.
    assert not packed.supports(Transformer(preset("small-dsa", vocab_size=300, num_hidden_layers=2)))


@pytest.mark.parametrize("path", ["packed", "buckets"])
def test_bf16_update_follows_the_fp32_gradient(tok, monkeypatch, path):
    """grpo.dtype = "bf16": the policy, old-policy and reference forwards run under bf16 autocast (master
    weights and optimizer fp32). On the same rollouts its gradient points where the fp32 one does, and the
    statistics agree to bf16 rounding; a bad dtype is refused."""
    if path == "buckets":
        monkeypatch.setattr(packed, "supports", lambda model: False)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.1))
    grads, recs = {}, {}
    for dtype in ("fp32", "bf16"):
        cfg = GRPOConfig(task="arithmetic", prompts_per_step=4, G=4, beta=0.04, lr=0.1, grad_clip=0.0,
                         max_new_tokens=24, dtype=dtype)
        tr = GRPOTrainer(copy.deepcopy(model), tok, cfg, progress=False)
        assert tr.amp_dtype == (torch.bfloat16 if dtype == "bf16" else None)
        tr.stepper.opt = torch.optim.SGD(tr.stepper.params, lr=cfg.lr)
        got = _record_grads(tr.stepper.opt)
        recs[dtype] = tr.update(_rollouts(tr, seed=3), 0)
        grads[dtype] = torch.cat([g.flatten() for g in got[0]])
        assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    a, b = grads["fp32"], grads["bf16"]
    assert b.abs().sum() > 0 and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
    assert recs["bf16"]["loss"] == pytest.approx(recs["fp32"]["loss"], rel=0.05, abs=1e-3)
    with pytest.raises(ValueError, match="grpo dtype"):
        GRPOConfig(dtype="fp16").validate()
