"""The Part II measurements on the ground truth, too long for a chapter:
``python -m diffnotes.representation.eval_representation [--only tangents,dimension,...]``.

Writes ``diffnotes/representation/results/representation.json`` (each section with its own
command, wall time, threads and date). Sections:

- ``tangents``: plain, contractive and denoising autoencoders (Gaussian and masking corruption)
  on 16×16 one-circle scenes with a 3-D code: principal angles between the decoder's tangent
  space and the generator's true tangents (x, y, radius), the encoder's motion under tangent vs
  normal perturbations of equal size, reconstruction error; baselines: local PCA of the data, a
  random 3-D subspace.
- ``dimension``: intrinsic dimension by local PCA of the scenes, of β-VAE latents and of the
  shapes UNet's bottleneck (``mid_block``) features, against the 3 continuous factors.
- ``dae``: denoising autoencoders on the analytic mixture at several σ against the exact score.
- ``denoisers``: the Part I models as denoisers at every noise level (the 2-D moons MLP against
  the training set's exact posterior mean; the digits UNet against the best linear denoiser).
- ``betavae``: β-VAE for several β on 32×32 one-object scenes: MIG, DCI, SAP against (shape, x,
  y, radius), and latent traversals (PNG, base64) for the chapter's explorer.
- ``infogan``: the shipped InfoGAN's codes against the true factors.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "representation.json"
SECTIONS = ("tangents", "dimension", "dae", "denoisers", "betavae", "infogan")
BETAS = (1.0, 4.0, 16.0)
DAE_SIGMAS = (1.0, 0.5, 0.25, 0.1, 0.05)


def mixture():
    """The 2-D three-component mixture used by the chapter and the tests."""
    from ..models.gmm import GaussianMixture

    return GaussianMixture(means=[[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], stds=[0.3, 0.4, 0.25],
                           weights=[0.3, 0.4, 0.3])


def circle_data(n: int, seed: int, resolution: int = 16):
    from .manifold import render_scenes, sample_scene_params

    p = sample_scene_params(n, seed)
    return torch.from_numpy(render_scenes(p, resolution)).float(), p


AE_CONFIGS = {
    "plain": dict(kind="plain"),
    "contractive": dict(kind="contractive", lam=0.01),
    "denoising (Gaussian σ=0.2)": dict(kind="denoising", corruption="gaussian", level=0.2),
    "denoising (masking p=0.25)": dict(kind="denoising", corruption="mask", level=0.25),
}


def tangents(steps: int = 2500, n_train: int = 4000, n_test: int = 100) -> dict:
    from . import autoencoders as A
    from .manifold import local_pca_tangents, principal_angles, true_tangents

    X, _ = circle_data(n_train, 1)
    Xt, pt = circle_data(n_test, 99)
    T = true_tangents(pt)
    out = {"n_train": n_train, "n_test": n_test, "steps": steps, "resolution": 16, "models": {}}
    for name, cfg in AE_CONFIGS.items():
        torch.manual_seed(0)
        m = A.Autoencoder(256, 3, (128,), "softplus")
        res = A.train_autoencoder(m, X, steps=steps, lr=2e-3, seed=0, **cfg)
        ang = A.tangent_angles(m, Xt, T)
        sens = A.encoder_sensitivity(m, Xt, T)
        with torch.no_grad():
            rec = float(A.reconstruction_loss(m, Xt))
        out["models"][name] = {"config": {k: v for k, v in cfg.items()},
                               "angles_mean_deg": ang.mean(0).tolist(),
                               "angle_mean_deg": float(ang.mean()),
                               "sensitivity": sens, "test_reconstruction": rec,
                               "train_seconds": res["seconds"]}
        print(name, out["models"][name], flush=True)
    Tl = local_pca_tangents(X.numpy(), Xt.numpy(), 20, 3)
    ang_l = np.degrees(np.stack([principal_angles(torch.from_numpy(Tl[i]), torch.from_numpy(T[i])).numpy()
                                 for i in range(n_test)]))
    g = torch.Generator().manual_seed(0)
    ang_r = np.degrees(np.stack([principal_angles(torch.randn(256, 3, generator=g, dtype=torch.float64),
                                                  torch.from_numpy(T[i])).numpy() for i in range(n_test)]))
    out["baselines"] = {"local PCA of the data (20 neighbours)": {"angles_mean_deg": ang_l.mean(0).tolist(),
                                                                  "angle_mean_deg": float(ang_l.mean())},
                        "random 3-D subspace": {"angles_mean_deg": ang_r.mean(0).tolist(),
                                                "angle_mean_deg": float(ang_r.mean())}}
    return out


def dimension(n: int = 3000, n_unet: int = 800, vae_steps: int = 2000) -> dict:
    from .manifold import local_pca_dimension, sample_scene_params

    out = {"true_continuous_factors": 3, "threshold": 0.9, "n_neighbors": 15}
    X, _ = circle_data(n, 1)
    out["scenes_16px"] = float(local_pca_dimension(X.numpy(), 15, 100)["dimension"])
    # the β-VAE's latent means (β = 4, d = 8) on the same kind of scenes at 32×32
    from .disentanglement import encode_means, train_beta_vae
    X32, _ = circle_data(n, 1, 32)
    vae = train_beta_vae(X32, beta=4.0, d=8, steps=vae_steps, seed=0)["model"]
    mu = encode_means(vae, X32).numpy()
    out["betavae_latents"] = float(local_pca_dimension(mu, 15, 100)["dimension"])
    out["betavae_active_units"] = int((mu.var(0) > 0.05).sum())
    # the shapes UNet's bottleneck features of 64×64 colour renders of the same scenes
    from ..data.shapes import render_objects
    from ..features import diffusion_features
    from ..models.load import load_pipeline

    pipe = load_pipeline("shapes")
    p = sample_scene_params(n_unet, 3)
    ims = np.stack([render_objects([dict(shape="circle", color="white", center=(p["x"][i], p["y"][i]),
                                         radius=p["radius"][i])], background="plain")[0]
                    for i in range(n_unet)])
    f = diffusion_features(pipe, ims, t=0, blocks=("mid_block",),
                           generator=torch.Generator().manual_seed(0))
    feats = f.reshape(len(f), -1).numpy()
    out["unet_mid_block_features"] = float(local_pca_dimension(feats, 15, 100)["dimension"])
    out["unet_feature_dim"] = int(feats.shape[1])
    out["pixels_64px_rgb"] = float(local_pca_dimension(ims.reshape(n_unet, -1), 15, 100)["dimension"])
    return out


def dae(steps: int = 2000, grid: int = 15) -> dict:
    from .score import dae_score, relative_error, smoothed_score, train_dae

    gmm = mixture()
    y = gmm.sample(4000, torch.Generator().manual_seed(5))
    s0 = gmm.score(y, 1.0)
    lin = torch.linspace(-2.2, 2.2, grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    G = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    out = {"sigmas": list(DAE_SIGMAS), "steps": steps, "grid": lin.tolist(), "results": {}}
    for sigma in DAE_SIGMAS:
        res = train_dae(lambda n, g: gmm.sample(n, g), sigma, steps=steps, batch_size=512, seed=0)
        with torch.no_grad():
            est = dae_score(res["model"], y.float(), sigma).double()
            field = dae_score(res["model"], G.float(), sigma).double()
        out["results"][str(sigma)] = {
            "err_vs_data_score": relative_error(est, s0),
            "err_vs_smoothed_score": relative_error(est, smoothed_score(gmm, y, sigma)),
            "smoothed_vs_data_score": relative_error(smoothed_score(gmm, y, sigma), s0),
            "field": np.round(field.numpy(), 4).tolist(), "seconds": res["seconds"]}
        print(sigma, {k: v for k, v in out["results"][str(sigma)].items() if k != "field"}, flush=True)
    return out


def denoisers(ts=(10, 50, 100, 200, 400, 700, 950)) -> dict:
    from ..models import digits as DG
    from ..models.toy2d import load_toy2d, make_dataset
    from ..schedules import alphas_cumprod, make_betas
    from .score import denoise_with_eps_model, empirical_posterior_mean

    ac = alphas_cumprod(make_betas("linear", 1000))
    model = load_toy2d("moons")
    data = make_dataset("moons", 4000, seed=0)
    x0 = data[:1000].double()
    out = {"ts": list(ts), "moons": [], "digits": []}
    for t in ts:
        g = torch.Generator().manual_seed(t)
        r = denoise_with_eps_model(lambda x, tt: model(x, tt), x0, t, ac, g)
        a = float(ac[t])
        opt = empirical_posterior_mean(data, r["x_t"], a)
        rmse = lambda u, v: float(((u - v) ** 2).sum(1).mean().sqrt())
        out["moons"].append({"t": t, "sigma": r["sigma"], "model_vs_clean": rmse(r["x0_hat"], x0),
                             "optimal_vs_clean": rmse(opt, x0), "model_vs_optimal": rmse(r["x0_hat"], opt),
                             "noisy_vs_clean": rmse(r["x_t"] / math.sqrt(a), x0)})
    unet = DG.load_unet()
    xtr, _ = DG.load_digits_data("train")
    xte, _ = DG.load_digits_data("test")
    Xtr = xtr.reshape(len(xtr), -1).double()
    mu, C = Xtr.mean(0), torch.cov(Xtr.T)
    eps_model = DG.digits_eps_model(unet)
    for t in ts:
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            r = denoise_with_eps_model(eps_model, xte.double(), t, ac, g)
        a = float(ac[t])
        y = (r["x_t"] / math.sqrt(a)).reshape(len(xte), -1)
        wiener = mu + (y - mu) @ torch.linalg.solve(C + r["sigma"] ** 2 * torch.eye(len(mu), dtype=torch.float64), C).T
        x = xte.reshape(len(xte), -1).double()
        mse = lambda u: float(((u - x) ** 2).mean())
        out["digits"].append({"t": t, "sigma": r["sigma"], "unet_mse": mse(r["x0_hat"].reshape(len(xte), -1)),
                              "wiener_mse": mse(wiener), "noisy_mse": mse(y)})
    print(out, flush=True)
    return out


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def traversal_grid(decode, z0: torch.Tensor, values, pad: int = 1, size: int = 32) -> np.ndarray:
    """Rows = latent dimensions, columns = values given to that dimension (others at z0)."""
    d = z0.shape[0]
    rows = []
    for j in range(d):
        Z = z0.repeat(len(values), 1)
        Z[:, j] = torch.as_tensor(values, dtype=Z.dtype)
        with torch.no_grad():
            ims = decode(Z).reshape(len(values), size, size).numpy()
        rows.append(np.concatenate([np.pad(im, pad, constant_values=1.0) for im in ims], 1))
    return np.concatenate(rows, 0)


def betavae(steps: int = 1200, n_train: int = 4000, n_test: int = 2000, d: int = 8) -> dict:
    from ..data.shapes import TRAIN_SHAPES
    from .disentanglement import dci, encode_means, mig, sap, train_beta_vae
    from .infogan import shapes_dataset

    Xtr, _ = shapes_dataset(n_train, seed=11)
    Xte, pte = shapes_dataset(n_test, seed=12)
    Xtr, Xte = Xtr.reshape(n_train, -1), Xte.reshape(n_test, -1)
    factors = np.c_[pte["shape"], pte["x"], pte["y"], pte["radius"]]
    disc = [True, False, False, False]
    out = {"betas": list(BETAS), "d": d, "steps": steps, "factors": ["shape", "x", "y", "radius"],
           "shapes": list(TRAIN_SHAPES), "results": {}}
    for beta in BETAS:
        res = train_beta_vae(Xtr, beta=beta, d=d, steps=steps, seed=0)
        vae = res["model"]
        mu = encode_means(vae, Xte).numpy()
        keep = np.argsort(-mu.var(0))
        z0 = torch.from_numpy(mu[0]).float()
        grid = traversal_grid(lambda Z: vae.decode(Z), z0, np.linspace(-2.5, 2.5, 7))
        grid = grid.reshape(d, -1, grid.shape[1])[keep.tolist()].reshape(-1, grid.shape[1])  # by variance
        r = {"mig": mig(mu, factors, discrete=disc)["mig"],
             "dci": {k: v for k, v in dci(mu, factors, discrete=disc, method="forest").items()
                     if k in ("disentanglement", "completeness", "informativeness")},
             "dci_linear": {k: v for k, v in dci(mu, factors, discrete=disc).items()
                            if k in ("disentanglement", "completeness", "informativeness")},
             "sap": sap(mu, factors, discrete=disc)["sap"],
             "recon": float(res["losses"][-200:, 1].mean()), "kl": float(res["losses"][-200:, 2].mean()),
             "active_units": int((mu.var(0) > 0.05).sum()), "latent_variance": mu.var(0)[keep].tolist(),
             "traversal_png": _png_b64(grid), "seconds": res["seconds"]}
        out["results"][str(beta)] = r
        print(beta, {k: v for k, v in r.items() if k != "traversal_png"}, flush=True)
    return out


def infogan() -> dict:
    from .infogan import evaluate, load_infogan

    G, D = load_infogan()
    r = evaluate(G, D, n=3000)
    print(r, flush=True)
    return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffnotes.representation.eval_representation")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in a.only.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--only takes names from {SECTIONS}, got {name!r}")
        t0 = time.perf_counter()
        res = globals()[name]()
        import fcntl

        lock = open(RESULTS.with_suffix(".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)             # sections may run in parallel processes
        rec = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        rec[name] = {"command": f"python -m diffnotes.representation.eval_representation --only {name}",
                     "wall_seconds": round(time.perf_counter() - t0, 1), "threads": a.threads,
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "torch": torch.__version__, "result": res}
        RESULTS.write_text(json.dumps(rec, indent=1) + "\n")
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        print(f"== {name} done in {rec[name]['wall_seconds']} s", flush=True)



def load_results(section: str | None = None) -> dict:
    """The shipped record (or one section's ``result``). Raises FileNotFoundError naming the
    command when it has not been run."""
    if not RESULTS.exists():
        raise FileNotFoundError(f"{RESULTS} not found; run `python -m diffnotes.representation."
                                f"eval_representation`")
    rec = json.loads(RESULTS.read_text())
    if section is None:
        return rec
    if section not in rec:
        raise KeyError(f"section {section!r} not in {RESULTS.name}; run `python -m diffnotes."
                       f"representation.eval_representation --only {section}`")
    return rec[section]["result"]


if __name__ == "__main__":
    main()
