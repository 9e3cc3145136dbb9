"""Synthetic level codes shared by the kernel tests (tests/kernels/test_kernels_*.py import it:
pytest puts this folder on ``sys.path``), and the CPU kernel tests' comparisons."""
import torch
import torch.nn.functional as F

#: Products sum in another order than ``F.linear``: the tolerance of the CPU kernel tests, per dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def bits(t):
    """The bytes of ``t`` (bit-exact comparisons)."""
    return t.contiguous().view(torch.uint8)


def assert_close_linear(y, x, wl, b, dtype):
    """``y`` is ``F.linear(x, wl, b)`` within :data:`TOL` of ``dtype`` (relative to the largest output)."""
    ref = F.linear(x.float(), wl.float(), None if b is None else b.float())
    scale = 1 + ref.abs().max().item()
    err = (y.float() - ref).abs().max().item() if y.numel() else 0.0
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert err <= TOL[dtype] * scale, (err, scale)


def make_codes(structure, n, k, num_levels, gen=None):
    """Codes ``N - 1`` in ``0..T`` for a weight `[n, k]` whose level 1 has the given structure."""
    if structure == "unstructured":
        return torch.randint(0, num_levels + 1, (n, k), generator=gen)
    if structure == "2:4":
        kp = -(-k // 4) * 4
        # Level 1 keeps exactly 2 of every 4 along in_features; other levels grow unstructured.
        order = torch.rand(n, kp // 4, 4, generator=gen).argsort(-1)
        codes = torch.randint(1, num_levels + 1, (n, kp // 4, 4), generator=gen)
        codes.scatter_(-1, order[..., :2], 0)
        return codes.reshape(n, kp)[:, :k]
    if structure == "block64":
        tn, tk = -(-n // 64), -(-k // 64)
        block = torch.randint(0, num_levels + 1, (tn, tk), generator=gen)
        block.view(-1)[0] = 0  # one full tile at every level
        block.view(-1)[-1] = num_levels  # one tile empty at every sparse level
        return block.repeat_interleave(64, 0).repeat_interleave(64, 1)[:n, :k]
    raise ValueError(structure)
