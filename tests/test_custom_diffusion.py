"""Custom Diffusion (diffnotes.personalization.custom_diffusion): only attn2 K/V and one
embedding row change, the closed-form merge satisfies its constraint exactly and is the KKT
solution, no new concept leaves W0, on the SD 1.5 block layout."""
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization import custom_diffusion as CD
from diffnotes.personalization.common import concept_images


def _random(seed=0, d_out=6, d=8, N=30, s=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    return r(d_out, d), r(N, d), r(s, d), r(d_out, s)


def test_merge_constraint_exact_and_kkt():
    W0, Cr, C, V = _random()
    W = CD.merge_custom_diffusion(W0, Cr, C, V)
    assert (W @ C.T - V).abs().max() < 1e-10
    # brute force: the KKT system of min ||(W - W0) Cr^T||^2 s.t. W C^T = V, row by row
    M = Cr.T @ Cr
    d, s = C.shape[1], C.shape[0]
    K = torch.zeros(d + s, d + s, dtype=torch.float64)
    K[:d, :d], K[:d, d:], K[d:, :d] = 2 * M, -C.T, C
    for i in range(W0.shape[0]):
        rhs = torch.cat([2 * M @ W0[i], V[i]])
        sol = torch.linalg.solve(K, rhs)
        assert (sol[:d] - W[i]).abs().max() < 1e-9
    # any other feasible W is worse: add a direction in the null space of C
    ns = torch.linalg.svd(C, full_matrices=True).Vh[s:]
    W2 = W + 0.1 * torch.randn(W0.shape[0], ns.shape[0], dtype=torch.float64) @ ns
    assert (W2 @ C.T - V).abs().max() < 1e-10
    obj = lambda X: float(((X - W0) @ Cr.T).pow(2).sum())  # noqa: E731
    assert obj(W) < obj(W2)


def test_merge_no_concepts_and_consistent_targets():
    W0, Cr, C, V = _random(1)
    assert torch.equal(CD.merge_custom_diffusion(W0, Cr, None, None), W0)
    assert torch.equal(CD.merge_custom_diffusion(W0, Cr, C[:0], V[:, :0]), W0)
    # targets that W0 already meets: W = W0
    W = CD.merge_custom_diffusion(W0, Cr, C, W0 @ C.T)
    assert (W - W0).abs().max() < 1e-10
    with pytest.raises(ValueError, match="V"):
        CD.merge_custom_diffusion(W0, Cr, C, V[:, :2])
    with pytest.raises(ValueError, match="C_reg"):
        CD.merge_custom_diffusion(W0, Cr[:, :3], C, V)


def test_only_kv_and_one_row_change_on_sd15_layout():
    pipe = load_pipeline("sd-1.5-layout-tiny")
    cs = concept_images("heart", n=2, seed=0)
    u0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    t0 = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    res = CD.custom_diffusion(pipe, cs, cs.captions, steps=2, num_class_images=1, lr=1e-2,
                              progress=False)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, u0[k])]
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    tid = res.extra["token_id"]
    emb_key = [k for k in t0 if "token_embedding" in k][0]
    new = pipe.text_encoder.state_dict()[emb_key]
    assert torch.equal(new[:tid], t0[emb_key][:tid])          # old rows bitwise
    for k, v in pipe.text_encoder.state_dict().items():
        if k != emb_key:
            assert torch.equal(v, t0[k])
    n_kv = sum(m.weight.numel() for m in CD.kv_layers(pipe.unet).values())
    assert res.trained_parameters == n_kv + new.shape[1]
    assert n_kv / sum(p.numel() for p in pipe.unet.parameters()) < 0.05


def test_bad_input():
    pipe = load_pipeline("sd-1.5-layout-tiny")
    cs = concept_images("heart", n=2, seed=0)
    with pytest.raises(ValueError, match="prompt"):
        CD.custom_diffusion(pipe, cs, "a star", progress=False)
    with pytest.raises(ValueError, match="steps"):
        CD.custom_diffusion(pipe, cs, cs.captions, steps=0)
