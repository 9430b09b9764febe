"""A small input sampler for the corpus entries (the lead will replace it with gradverify's
own domains later).

make_inputs(entry, dtype=torch.float64, seed=0) -> (args, kwargs): one value per item of
entry.inputs, in the order written there (forward's parameter order), passed positionally;
kwargs is always empty. A tensor spec is any object with .shape/.dtype/.domain/.low/.high/
.requires_grad (manifest.T); anything else is passed through unchanged.
Values are drawn in float64 and then cast, so float32 and float64 cases see the same numbers.
"""
import torch
import torch.nn.functional as F


def _is_spec(v):
    return all(hasattr(v, a) for a in ("shape", "dtype", "domain", "requires_grad"))


def _float(shape, domain, g):
    f64 = torch.float64
    if domain == "any":
        return torch.randn(shape, generator=g, dtype=f64)
    if domain == "positive":
        return torch.rand(shape, generator=g, dtype=f64) * 1.5 + 0.5
    if domain == "negative":
        return -(torch.rand(shape, generator=g, dtype=f64) * 1.5 + 0.5)
    if domain == "nonzero":
        mag = torch.rand(shape, generator=g, dtype=f64) + 0.5
        sign = torch.where(torch.rand(shape, generator=g, dtype=f64) < 0.5, -1.0, 1.0)
        return sign * mag
    if domain == "unit":           # open interval (-1, 1), away from the ends
        return torch.rand(shape, generator=g, dtype=f64) * 1.8 - 0.9
    if domain == "probability":    # open interval (0, 1), away from the ends
        return torch.rand(shape, generator=g, dtype=f64) * 0.9 + 0.05
    if domain == "symmetric":
        b = torch.randn(shape, generator=g, dtype=f64)
        return 0.5 * (b + b.transpose(-1, -2))
    if domain == "spd":            # A A^T / n + I: eigenvalues in about [1, 5]
        n = shape[-1]
        b = torch.randn(shape, generator=g, dtype=f64)
        return b @ b.transpose(-1, -2) / n + torch.eye(n, dtype=f64)
    if domain == "simplex":        # last dim sums to 1
        return torch.softmax(torch.randn(shape, generator=g, dtype=f64), -1)
    if domain == "unit_norm":      # last dim has norm 1
        x = torch.randn(shape, generator=g, dtype=f64)
        return x / x.norm(dim=-1, keepdim=True)
    if domain == "distinct":       # a random permutation of well-separated values
        n = 1
        for s in shape:
            n *= s
        vals = torch.linspace(-2.0, 2.0, n, dtype=f64)
        return vals[torch.randperm(n, generator=g)].reshape(shape)
    if domain == "one_hot":        # one-hot along the last dim
        classes = torch.randint(0, shape[-1], tuple(shape[:-1]), generator=g)
        return F.one_hot(classes, shape[-1]).to(f64)
    raise ValueError(f"unknown domain {domain!r}")


def make_tensor(spec, dtype=torch.float64, generator=None):
    shape = tuple(spec.shape)
    if spec.dtype == "int64":
        low = 0 if spec.low is None else spec.low
        high = spec.high
        if high is None:
            raise ValueError("an int64 input needs high")
        return torch.randint(low, high, shape, generator=generator)
    if spec.dtype == "bool":
        return torch.rand(shape, generator=generator) < 0.5
    x = _float(shape, spec.domain, generator).to(dtype)
    if spec.requires_grad:
        x.requires_grad_(True)
    return x


def make_inputs(entry, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = []
    for name, v in entry.inputs.items():
        args.append(make_tensor(v, dtype, g) if _is_spec(v) else v)
    return args, {}
