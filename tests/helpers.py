"""Helpers the op tests share (one copy each)."""
import torch


def close(got, want, tol=2e-5):
    """got ≈ want with relative tolerance tol, absolute tol scaled by want's largest magnitude; no NaN (a NaN is an
    element a kernel never wrote)."""
    assert got is not None and want is not None
    assert not torch.isnan(got).any(), "NaN in the output"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def dt_mask(rng, B, L, device="cpu"):
    """The attention mask HarmoDT builds, [B, 1, L, L]: causal, left-padded keys hidden (random padding up to half
    the sequence), every token sees itself."""
    valid = torch.arange(L)[None, :] >= torch.randint(0, max(1, L // 2), (B, 1), generator=rng)
    m = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
    return m[:, None].to(device)
