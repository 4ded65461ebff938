"""The sampler's draws: inverse-CDF sampling is exact, zero-probability tokens never appear, speculative
verification keeps the target distribution, and a generator's stream alone decides a request's tokens."""

from __future__ import annotations

import pytest
import torch

from nanoseek.infer.sampling import SamplingParams, draw, inverse_cdf, probs, row_uniforms, verify_drafts

pytestmark = pytest.mark.usefixtures("one_thread")
N = 20_000  # rows drawn at once: frequencies within ~0.015 of the probabilities


def _freq(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).float() / tokens.numel()


def test_inverse_cdf_is_an_exact_draw_and_skips_zero_mass():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    u = torch.rand(N, generator=torch.Generator().manual_seed(0))
    tok = inverse_cdf(p.expand(N, -1), u)
    f = _freq(tok, 6)
    assert f[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(f, p, atol=0.015, rtol=0)
    # The edges of [0, 1): u = 0 takes the first token with mass, u just below 1 the last one.
    edge = inverse_cdf(p.expand(2, -1) * 3.0, torch.tensor([0.0, 1.0 - 2.0 ** -24]))  # unnormalised is fine
    assert edge.tolist() == [1, 4]


def test_draw_follows_probs_and_consumes_only_sampled_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=1.0, top_k=3)]
    p = probs(logits, params)
    gen = torch.Generator().manual_seed(1)
    tok = torch.cat([draw(p, [gen], params) for _ in range(4000)])
    torch.testing.assert_close(_freq(tok, 4), p[0], atol=0.03, rtol=0)
    assert _freq(tok, 4)[3] == 0  # outside the top-k
    # A greedy row next to sampled ones draws nothing from its generator.
    g_greedy, g_sampled = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    row_uniforms([SamplingParams(), SamplingParams(temperature=1.0)], [g_greedy, g_sampled], "cpu")
    assert torch.equal(g_greedy.get_state(), torch.Generator().manual_seed(2).get_state())
    assert not torch.equal(g_sampled.get_state(), g_greedy.get_state())


def test_speculative_verification_keeps_the_target_distribution():
    """The first token emitted after a draft (the draft itself when accepted, else the replacement) is
    distributed as p0, whatever the draft distribution q; the token after an accepted draft follows p1."""
    g = torch.Generator().manual_seed(3)
    V = 5
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0])
    p1 = torch.tensor([0.25, 0.25, 0.0, 0.0, 0.5])
    q = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])  # a poor draft: rejections happen often
    drafts = inverse_cdf(q.expand(N, -1), torch.rand(N, generator=g))
    params = [SamplingParams(temperature=1.0)] * N
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    accepted, token = verify_drafts(p0.expand(N, -1), p1.expand(N, -1), q.expand(N, -1), drafts, params, gens)
    first = torch.where(accepted, drafts, token)
    torch.testing.assert_close(_freq(first, V), p0, atol=0.015, rtol=0)
    torch.testing.assert_close(_freq(token[accepted], V), p1, atol=0.02, rtol=0)
    expected_accept = torch.minimum(p0, q).sum()  # P(accept) = sum_x min(p0, q)
    assert abs(accepted.float().mean() - expected_accept) < 0.015
    # Greedy rows: accepted iff the draft is p0's argmax; then p1's argmax follows, else p0's argmax.
    greedy = [SamplingParams()] * 2
    acc, tok = verify_drafts(p0.expand(2, -1), p1.expand(2, -1), q.expand(2, -1), torch.tensor([1, 3]), greedy,
                             [None, None])
    assert acc.tolist() == [True, False] and tok.tolist() == [4, 1]


@pytest.mark.parametrize("block", [1, 3, 64])
def test_row_random_blocks_are_the_generators_own_stream(block):
    """RowRandom draws its uniforms in blocks; the values, in order, are those of one draw at a time from the
    same seeded generator (so a request's tokens are the same as unbuffered), across block boundaries,
    and row_uniforms takes a RowRandom and a plain generator alike."""
    from nanoseek.infer.sampling import RowRandom

    one_by_one = torch.Generator().manual_seed(7)
    expected = [float(torch.rand((), generator=one_by_one)) for _ in range(150)]
    rr = RowRandom(torch.Generator().manual_seed(7), block=block)
    assert [rr.uniform() for _ in range(150)] == expected
    params = [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.5)]
    a = [RowRandom(torch.Generator().manual_seed(s), block=block) for s in (1, 2, 3)]
    b = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    for _ in range(70):
        assert torch.equal(row_uniforms(params, a, "cpu"), row_uniforms(params, b, "cpu"))
    assert a[1]._buf == []  # the greedy row never drew
    with pytest.raises(ValueError, match="block"):
        RowRandom(torch.Generator(), block=0)
