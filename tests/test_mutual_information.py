"""The variational bound of Ahmad's notes, eqs 6.3-6.6 (InfoGAN's Lemma 5.1), with a *learned*
Q(c | x): maximising the bound over Q recovers the true posterior and makes the bound exact
(diffnotes.representation.mutual_information), and the notes' worked numbers."""
import math

import numpy as np
import torch

from diffnotes.representation import mutual_information as MI

P = np.array([[0.4, 0.1], [0.1, 0.4]])              # rows c, columns x


def test_worked_numbers():
    assert abs(MI.mutual_information(P) - 0.192745) < 1e-6
    assert abs(MI.mutual_information([[0.3, 0.2], [0.1, 0.4]]) - 0.086305) < 1e-6
    post = P / P.sum(0, keepdims=True)
    assert abs(MI.table_mi_lower_bound(P, post) - 0.192745) < 1e-6          # tight
    assert abs(MI.table_mi_lower_bound(P, np.full((2, 2), 0.5))) < 1e-12     # uniform Q: 0
    Q = np.array([[0.6, 0.3], [0.4, 0.7]])
    assert abs(MI.table_mi_lower_bound(P, Q) - 0.134121) < 1e-6
    # eq 6.6's first line as printed, c' ~ P(c) independent of x: -0.223144 here
    pc = P.sum(1)
    printed = MI.entropy(pc) + sum(P[:, j].sum() * (pc * np.log(post[:, j])).sum() for j in range(2))
    assert abs(printed - (-0.223144)) < 1e-6


def test_learned_q_reaches_the_posterior_and_the_bound_is_exact():
    rng = np.random.default_rng(0)
    J = rng.random((3, 5)) ** 2
    J /= J.sum()
    Pt = torch.tensor(J)
    logits = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)    # Q(c | x) = softmax_c
    opt = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-14, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(Pt * torch.log_softmax(logits, 0)).sum()     # -(bound - H(c)), eq 6.5
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    Q = torch.softmax(logits.detach(), 0).numpy()
    post = J / J.sum(0, keepdims=True)
    assert np.abs(Q - post).max() < 1e-6
    I = MI.mutual_information(J)
    assert abs(MI.table_mi_lower_bound(J, Q) - I) < 1e-10
    assert I > 0.05                                     # a dependent table: the check is not 0 = 0
