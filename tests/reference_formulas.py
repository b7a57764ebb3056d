"""Independent float64 NumPy versions of the published loss formulas, written from the papers, for tests."""

import numpy as np


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def pairwise(name, pc, pr, rc, rr, beta, eps=0.0, **kw):
    """Loss per example; pc/pr policy log-probs, rc/rr reference log-probs (already length-normalised if needed)."""
    c, r = pc - rc, pr - rr
    h = c - r
    z = beta * h
    if name == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if name == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if name in ("ipo", "ipo_mean"):
        return (h - 1.0 / (2 * beta)) ** 2
    if name == "exo_pair":
        e = eps if eps else 1e-3
        return sig(z) * (logsig(z) - np.log(1 - e)) + sig(-z) * (logsig(-z) - np.log(e))
    if name == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if name == "bco_pair":
        delta = kw.get("delta")
        if delta is None:
            delta = np.mean(np.concatenate([beta * c, beta * r]))
        return -logsig(beta * c - delta) - logsig(-(beta * r - delta))
    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * c)) + sig(beta * r)
    if name == "apo_down":
        return sig(beta * c) + (1 - sig(beta * (c - r)))
    if name in ("aot", "aot_unpaired"):
        # δ = sort(a) − sort(b); the term of rank k belongs to the example whose a has rank k.
        a, b = (pc - pr, rc - rr) if name == "aot" else (c, r)
        d = np.empty_like(a)
        d[np.argsort(a, kind="stable")] = np.sort(a) - np.sort(b)
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if name == "discopop":
        tau = kw.get("tau", 0.05)
        m = sig(z / tau)
        # m·exp(−z): where m underflows to 0 the product's limit is 0 (m decays as exp(z/τ), τ < 1).
        with np.errstate(over="ignore"):
            expo = np.where(m > 0, m * np.exp(np.minimum(-z, 700.0)), 0.0)
        return (1 - m) * -logsig(z) + expo
    if name == "simpo":
        gamma = kw.get("gamma", 0.5)
        zz = beta * (pc - pr) - gamma  # reference ignored
        return -(1 - eps) * logsig(zz) - eps * logsig(-zz)
    raise KeyError(name)
