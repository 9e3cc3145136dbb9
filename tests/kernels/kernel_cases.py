"""Synthetic level codes shared by the kernel tests (tests/kernels/test_kernels_*.py import it:
pytest puts this folder on ``sys.path``)."""
import torch


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
