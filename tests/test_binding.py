"""Attend-and-Excite and StructureDiffusion (diffnotes.editing.binding).

Exact properties in float64 on the shapes pipeline and on the SD-1.5-layout tiny pipeline:
A&E with thresholds 0 and step size 0 is plain sampling; StructureDiffusion on a one-phrase
prompt is plain cross-attention, and its layer output is M · mean(V_i) by hand; the A&E loss of
a real UNet pass against a hand computation (softmax, smoothing and maxima written out); one
small gradient step lowers the loss; refinement runs until the threshold or the cap; the worked
numbers of the study notes (step sizes, kernels, L([0.9, 0.3]) = 0.7, phrase spans); the
chunker on the shapes grammar; diffusers' StableDiffusionAttendAndExcitePipeline as a peer; bad
input.
"""
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import AttentionStore, BatchLayout, tokenize_prompt  # noqa: E402
from diffnotes.editing.binding import (StructureController, ae_loss,  # noqa: E402
                                       aligned_phrase_embeddings, attend_and_excite,
                                       attention_resolutions, default_attention_res,
                                       gaussian_kernel, max_attention_per_token, noun_phrases,
                                       phrase_token_spans, smooth_map, softmax_columns,
                                       step_sizes, structure_diffusion)
from diffnotes.editing.common import encode_prompts, pipe_timesteps  # noqa: E402

from pipeline_helpers import noise_latents, plain_sample  # noqa: E402

STEPS = 3
PROMPT, WORDS = "a red circle and a blue square", ["circle", "square"]


@pytest.fixture(scope="module")
def shapes():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    p.to(torch.float64)
    return p


_xT = noise_latents


def _plain(pipe, prompt, xT, steps=STEPS, gs=7.5):
    return plain_sample(pipe, prompt, xT, steps, gs)


# ---------------------------------------------------------------------------- exact no-ops
def test_ae_without_steps_or_thresholds_is_plain_sampling(pipe):
    """thresholds all 0 (never refines) and scale_factor 0: plain guided DDIM (<= 1e-10),
    although every altered step ran the loss pass with gradients."""
    xT = _xT(pipe)
    z, tr = attend_and_excite(pipe, PROMPT, WORDS, thresholds={0: 0.0, 1: 0.0},
                              scale_factor=0, max_iter_to_alter=STEPS,
                              num_inference_steps=STEPS, latents=xT, output_type="latent")
    ref = _plain(pipe, PROMPT, xT)
    assert (z - ref).abs().max() <= 1e-10
    assert tr["refined"] == {} and len(tr["loss"]) == STEPS
    assert tr["attention_res"] == default_attention_res(pipe.unet)


def test_structure_diffusion_one_phrase_is_plain(pipe):
    """A prompt that is one noun phrase: its phrase encoding equals the prompt's, V_1 = V_p,
    (V_p + V_1)/2 = V_p, so sampling is plain sampling."""
    xT = _xT(pipe, 1)
    prompt = "a large red circle"
    z, info = structure_diffusion(pipe, prompt, num_inference_steps=STEPS, latents=xT,
                                  output_type="latent")
    assert [p for p, _ in info["phrases"][0]] == [prompt]
    assert (z - _plain(pipe, prompt, xT)).abs().max() <= 1e-10


def test_structure_diffusion_two_phrases_changes_the_sample(pipe):
    xT = _xT(pipe, 2)
    z, info = structure_diffusion(pipe, PROMPT, num_inference_steps=STEPS, latents=xT,
                                  output_type="latent")
    assert [p for p, _ in info["phrases"][0]] == ["a red circle", "a blue square"]
    assert (z - _plain(pipe, PROMPT, xT)).abs().max() > 1e-6


def test_structure_layer_is_attention_times_mean_value(pipe):
    """One cross-attention layer under StructureController equals, by hand,
    to_out(softmax(Q K_p^T / sqrt d) · mean_i(W_V E_i)) (eq 3.28) on the conditional row and
    plain attention on the unconditional row; linear in the phrase values."""
    from diffnotes.attention import attention_layers
    unet = pipe.unet
    name = attention_layers(unet, "cross")[0]
    attn = unet.get_submodule(name)
    full, phrases, spans = aligned_phrase_embeddings(pipe, PROMPT)
    null = encode_prompts(pipe, "")
    g = torch.Generator().manual_seed(3)
    n_q = 16
    h = torch.randn((2, n_q, attn.to_q.in_features), generator=g, dtype=torch.float64)
    E = torch.cat([null, full])
    ctrl = StructureController(unet, [phrases], BatchLayout(1, True))
    store = AttentionStore(kinds=("cross",), controller=ctrl, layout=BatchLayout(1, True))
    store.attach(unet)
    try:
        with torch.no_grad():
            out = attn(h, encoder_hidden_states=E)
    finally:
        store.detach()

    def by_hand(hid, Ek, Ev):
        q = attn.head_to_batch_dim(attn.to_q(hid))
        k = attn.head_to_batch_dim(attn.to_k(Ek))
        v = attn.head_to_batch_dim(attn.to_v(Ev))
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(p @ v)))

    with torch.no_grad():
        V = torch.cat([attn.to_v(full), attn.to_v(phrases)]).mean(0, keepdim=True)
        q = attn.head_to_batch_dim(attn.to_q(h[1:]))
        k = attn.head_to_batch_dim(attn.to_k(full))
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
        cond = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(
            p @ attn.head_to_batch_dim(V))))
        assert (out[1:] - cond).abs().max() < 1e-10
        assert (out[:1] - by_hand(h[:1], null, null)).abs().max() < 1e-10
        assert len(spans) == 2 and phrases.shape[0] == 2


# ---------------------------------------------------------------------------- the loss
def test_ae_loss_of_a_unet_pass_by_hand(pipe):
    """The loss at step 0 (trace) against a hand computation from the cross-attention maps
    recorded by AttentionStore at the same layers: mean over heads and layers, softmax of
    100·A over the prompt's tokens (start and end excluded), a 3×3 smoothing written as a
    sum of shifted maps with reflect padding, max over pixels, 1 − max, max over subjects."""
    xT = _xT(pipe, 4)
    _, tr = attend_and_excite(pipe, PROMPT, WORDS, thresholds={0: 0.0}, scale_factor=0,
                              max_iter_to_alter=1, num_inference_steps=STEPS, latents=xT,
                              output_type="latent")
    res = tr["attention_res"]
    unet = pipe.unet
    store = AttentionStore(kinds=("cross",))
    store.attach(unet)
    t = pipe_timesteps(pipe, STEPS)[0]
    try:
        with torch.no_grad():
            unet(xT, torch.tensor([t]), encoder_hidden_states=encode_prompts(pipe, PROMPT))
    finally:
        store.detach()
    A = store.maps("cross", res=res)[0].double()                        # (h, w, M)
    n = tokenize_prompt(PROMPT, pipe.tokenizer)["length"]
    S = torch.softmax(100 * A[..., 1:n - 1], -1)
    k1 = torch.tensor([math.exp(-(1 / (2 * 0.5)) ** 2), 1.0, math.exp(-(1 / (2 * 0.5)) ** 2)],
                      dtype=torch.float64)
    K = torch.outer(k1, k1)
    K = K / K.sum()
    losses = []
    for w in WORDS:
        j = PROMPT.split().index(w) + 1                                  # + start token
        m = S[..., j - 1]
        P = np.pad(m.numpy(), 1, mode="reflect")
        hh, ww = m.shape
        sm = sum(K[a, b].item() * P[a:a + hh, b:b + ww] for a in range(3) for b in range(3))
        losses.append(max(0.0, 1 - sm.max()))
    # the library's kernel is the official one computed in float32 (bitwise diffusers'), the
    # hand one in float64: they differ by ~1e-8 relative
    assert abs(max(losses) - float(tr["loss"][0][0])) < 1e-7


def test_worked_numbers():
    """notes_editing §11/§24: L([0.9, 0.3]) = 0.7, L([1, 1]) = 0; α_i for N = 50; the two
    kernels; a constant map stays constant after smoothing."""
    assert abs(float(ae_loss(torch.tensor([0.9, 0.3], dtype=torch.float64))) - 0.7) < 1e-15
    assert float(ae_loss(torch.tensor([1.0, 1.0]))) == 0.0
    a = step_sizes(20, 50)
    for i, v in [(0, 20.0), (10, 18.9521), (20, 17.8429), (24, 17.3793)]:
        assert abs(a[i] - v) < 5e-5
    off = gaussian_kernel(0.5, 3, "official")
    assert torch.allclose(off, torch.tensor([[0.044919, 0.122103, 0.044919],
                                             [0.122103, 0.331911, 0.122103],
                                             [0.044919, 0.122103, 0.044919]],
                                            dtype=torch.float64), atol=1e-6)
    tb = gaussian_kernel(0.5, 3, "textbook")
    assert abs(tb[1, 1].item() - 0.619347) < 1e-6 and abs(tb[0, 0].item() - 0.011344) < 1e-6
    assert abs(off.sum().item() - 1) < 1e-6
    c = torch.full((5, 6), 0.37, dtype=torch.float64)
    assert torch.allclose(smooth_map(c, off / off.sum()), c, atol=1e-15)


def test_kernel_matches_diffusers():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.\
        pipeline_stable_diffusion_attend_and_excite import GaussianSmoothing
    k = GaussianSmoothing().weight[0, 0].double()
    assert torch.equal(k, gaussian_kernel(0.5, 3, "official"))


def test_softmax_columns_and_maxima():
    """Which tokens enter the softmax; maxima of a hand-made map (one-hot peaks)."""
    assert softmax_columns(9, 32, "prompt") == slice(1, 8)
    assert softmax_columns(9, 32, "diffusers") == slice(1, 31)
    assert softmax_columns(9, 32, "none") is None
    A = torch.zeros(4, 4, 6, dtype=torch.float64)
    A[..., 0] = 1.0                                          # all mass on the start token
    A[1, 2, 2] = 0.9
    m = max_attention_per_token(A, [[2], [3]], 6, "none")
    assert torch.allclose(m, torch.tensor([0.9, 0.0], dtype=torch.float64))


def test_small_gradient_step_lowers_the_loss(shapes):
    """First order: one A&E step with a small α lowers L (fp64). Uses 'none' so the loss is far
    from 0 and the gradient far from vanishing."""
    xT = _xT(shapes, 5)
    kw = dict(thresholds={0: 0.0}, max_iter_to_alter=1, num_inference_steps=STEPS,
              latents=xT, output_type="latent", softmax_tokens="none")
    _, tr0 = attend_and_excite(shapes, PROMPT, WORDS, scale_factor=0, **kw)
    g = tr0["grad_norm"][0]
    assert float(g[0]) == 0.0
    # re-run with a tiny step; the loss at step 1 is not comparable (DDIM step between), so
    # compare the losses of the same step by refinement: thresholds {0: 1} refines step 0
    _, tr1 = attend_and_excite(shapes, PROMPT, WORDS, scale_factor=1e-3, max_refinement_steps=1,
                               **{**kw, "thresholds": {0: 1.0}})
    assert tr1["refined"] == {0: 1}
    assert float(tr1["loss"][0][0]) < float(tr0["loss"][0][0])


def test_refinement_runs_to_the_cap_when_unreachable(shapes):
    """thresholds {0: 1.0} (unreachable unless a max is exactly 1): refinement at step 0 runs
    max_refinement_steps updates; at other steps nothing."""
    xT = _xT(shapes, 6)
    _, tr = attend_and_excite(shapes, PROMPT, WORDS, thresholds={0: 1.0, 1: 0.0},
                              scale_factor=1.0, max_refinement_steps=3, max_iter_to_alter=2,
                              num_inference_steps=STEPS, latents=xT, output_type="latent",
                              softmax_tokens="none")
    assert tr["refined"] == {0: 3}


def test_attention_resolution_rule(pipe):
    res = attention_resolutions(pipe.unet)
    d = default_attention_res(pipe.unet)
    assert d == res[-2]
    if pipe.unet.config.sample_size == 40:                 # SD 1.5 layout: 40, 20, 10, 5
        assert res == [40, 20, 10, 5] and d == 10
    else:                                                  # the shapes model: 16, 8
        assert res == [16, 8] and d == 16


# ---------------------------------------------------------------------------- the chunker
def test_chunker_on_the_shapes_grammar():
    from diffnotes.data.shapes import caption_objects
    rng = np.random.default_rng(0)
    from diffnotes.data import shapes as S
    for _ in range(50):
        k = int(rng.integers(1, 4))
        objs = [dict(shape=str(rng.choice(S.SHAPES)), color=str(rng.choice(list(S.COLORS))),
                     size=str(rng.choice(list(S.SIZES))), position=str(rng.choice(list(S.POSITIONS))))
                for _ in range(k)]
        ms = [bool(rng.integers(2)) for _ in range(k)]
        mp = [bool(rng.integers(2)) for _ in range(k)]
        cap, _ = caption_objects(objs, ms, mp)
        nps = [t for t, _ in noun_phrases(cap)]
        want = []
        for o, s, p in zip(objs, ms, mp):
            want.append(caption_objects([o], s, False)[0])
            if p:
                want.append(S.POSITION_PHRASES[o["position"]].split(None, 1)[1])
        assert nps == want, cap


def test_chunker_simple_english_and_spans(shapes):
    """Ahmad's notes' example: NPs and their token spans with a word-level tokenizer, without
    the determiner [2, 3], [6, 7], [10, 11] (notes_editing §12)."""
    p = "A blue chair and a red table in a green room."
    assert [t for t, _ in noun_phrases(p)] == ["a blue chair", "a red table", "a green room"]
    assert [t for t, _ in noun_phrases(p, include_determiner=False)] == [
        "blue chair", "red table", "green room"]
    spans = phrase_token_spans(p, shapes.tokenizer, include_determiner=False)
    assert [s for _, s in spans] == [[2, 3], [6, 7], [10, 11]]
    assert [t for t, _ in noun_phrases("A room with blue walls and a white sink.")] == [
        "a room", "blue walls", "a white sink"]


def test_aligned_embeddings_keep_the_rest(shapes):
    """Outside its span a phrase's sequence is the full prompt's; inside, the phrase's own
    encoding. CLIP's text encoder is causal, so the FIRST phrase's tokens see the same prefix
    alone as in the prompt and come out equal; the second phrase's differ (in the prompt
    they also saw "a red circle and")."""
    full, ph, spans = aligned_phrase_embeddings(shapes, PROMPT)
    for r, (_, pos) in enumerate(spans):
        rest = [j for j in range(full.shape[1]) if j not in pos]
        assert torch.equal(ph[r, rest], full[0, rest])
    assert torch.allclose(ph[0, spans[0][1]], full[0, spans[0][1]], atol=1e-12)
    assert not torch.allclose(ph[1, spans[1][1]], full[0, spans[1][1]], atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, name", [
    (dict(token_words=["triangle"]), "token_words"),
    (dict(thresholds={0: 1.5}), "thresholds"),
    (dict(thresholds={0: -0.1}), "thresholds"),
    (dict(scale_factor=-1), "scale_factor"),
    (dict(softmax_tokens="all"), "softmax_tokens"),
    (dict(attention_res=7), "attention_res"),
])
def test_bad_input(shapes, kw, name):
    args = dict(token_words=WORDS)
    args.update(kw)
    words = args.pop("token_words")
    with pytest.raises(ValueError, match=name):
        attend_and_excite(shapes, PROMPT, words, num_inference_steps=2, output_type="latent",
                          **args)


# ---------------------------------------------------------------------------- the peer
def test_peer_diffusers_attend_and_excite(shapes):
    """diffusers' StableDiffusionAttendAndExcitePipeline from the same components (scheduler
    with set_alpha_to_one=True, the DDIM of diffnotes.ddim whose last step goes to ᾱ = 1), the
    same latent, token indices, thresholds and diffusers' token slice, float64, 6 steps with
    refinement triggered at step 0: the final latents agree to 1e-8 (measured: 3e-12; what
    remains is the order of floating-point operations, PyTorch's fused attention in the
    self-attention layers against diffusers' bmm, amplified by a few gradient steps of size
    α ≈ 20; a wrong token slice, kernel or step size gives differences of 1e-2 and more)."""
    import warnings

    from diffusers import DDIMScheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionAttendAndExcitePipeline
    p = shapes
    sched = DDIMScheduler.from_config(p.scheduler.config, set_alpha_to_one=True)
    # diffusers keeps ᾱ in float32 and takes its square roots there; the library computes in
    # float64. Give the peer float64 ᾱ so the comparison measures the methods, not that.
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    peer = StableDiffusionAttendAndExcitePipeline(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
        scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    steps, thr = 6, {0: 0.99, 3: 0.995}
    xT = _xT(p, 7)
    idx = [3, 7]
    ref = peer(PROMPT, idx, num_inference_steps=steps, guidance_scale=7.5, latents=xT,
               thresholds=thr, max_iter_to_alter=4, scale_factor=20, attn_res=(16, 16),
               output_type="latent").images
    ours, tr = attend_and_excite(p, PROMPT, idx, thresholds=thr, max_iter_to_alter=4,
                                 scale_factor=20, softmax_tokens="diffusers",
                                 num_inference_steps=steps, latents=xT, output_type="latent")
    d = float((ours - ref).abs().max())
    print(f"max latent difference ours vs diffusers A&E: {d:.2e}; refined {tr['refined']}")
    assert 0 in tr["refined"], "the thresholds should trigger refinement"
    assert d <= 1e-8
