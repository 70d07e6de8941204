"""generate(compile=True) on the CPU (inductor): the compiled decode step draws the same tokens as eager.

Both paths run the same function on the same noise (drawn from the caller's generator outside the step), so
greedy columns must be identical and sampled columns identical up to float rounding of the logits (asserted
exactly: a near-tie flip on these tiny models would show up as a failure to look at). One call per head kind
covers CFG on (positions 0..2, cfg_interval=1) and off (cond-only logits afterwards) and greedy + sampled
sub-codebooks; a second call without CFG (no uncond half) reuses nothing and compiles its own graph.
Compile time dominates (~1 min per head kind on 2 shared cores).
"""
import pytest
import torch
import torch._dynamo

from generator import GPT, generate

pytestmark = pytest.mark.slow


def tiny(head):
    torch.manual_seed(0)
    m = GPT.from_preset("GPT-tiny", groups=2, codebook_size=32, grid=3, num_classes=10, head=head)
    if head == "parallel":
        torch.nn.init.normal_(m.output.weight, std=0.3)
    return m.eval()


@pytest.mark.parametrize("head", ["parallel", "ar"])
def test_compiled_decode_step_matches_eager(head):
    m = tiny(head)
    labels = torch.tensor([1, 5, 9])
    kw = dict(temperature=[0.0, 1.3], top_k=[None, 8], top_p=[None, 0.9])  # column 0 greedy, column 1 sampled
    for cfg in (dict(guidance_scale=3.0, cfg_interval=1), dict(guidance_scale=1.0)):
        a, la = generate(m, labels, generator=torch.Generator().manual_seed(0), return_logits=True, **cfg, **kw)
        b, lb = generate(m, labels, generator=torch.Generator().manual_seed(0), return_logits=True, compile=True,
                         **cfg, **kw)
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)  # what the sampler saw
        assert torch.equal(b[..., 0], a[..., 0])  # greedy column
        assert torch.equal(b, a)  # sampled column: same noise, same draw
        assert torch.equal(b[..., 0], lb[..., 0, :].argmax(-1))
    # a second compiled call with the same settings reuses the graph (and the static KV caches): no recompile
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    c = generate(m, labels, generator=torch.Generator().manual_seed(1), compile=True, guidance_scale=1.0,
                 return_logits=True, **kw)[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(c[..., 1], b[..., 1])  # another seed: other sampled tokens
