"""The HTTP pieces of the ingress without a Serve cluster: tokens, bearer auth, admission and the decode budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from taxonet.serve.errors import ApiError
from taxonet.serve.http import Admission, BearerAuth, PixelBudget, load_tokens

pytestmark = pytest.mark.unit


def test_tokens_are_stripped_and_several_are_accepted(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("  old-token ,new-token\n")  # as `echo` or an editor writes a Secret: trailing newline
    tokens = load_tokens({"TAXONET_API_TOKEN_FILE": str(secret)})
    assert tokens == ("old-token", "new-token")
    assert load_tokens({"TAXONET_API_TOKEN": "env-token\n"}) == ("env-token",)
    assert load_tokens({"TAXONET_API_TOKEN": "a,b", "TAXONET_API_TOKEN_FILE": str(secret)}) == (
        "a", "b", "old-token", "new-token")
    assert load_tokens({"TAXONET_API_TOKEN": " \n"}) == ()  # whitespace only: no token, not a token of spaces
    with pytest.raises(RuntimeError, match="TAXONET_API_TOKEN_FILE"):
        load_tokens({"TAXONET_API_TOKEN_FILE": str(tmp_path / "missing")})


def test_bearer_auth_accepts_every_configured_token_and_nothing_else() -> None:
    auth = BearerAuth(("old-token", "new-token"))
    assert not auth.open
    auth.check("Bearer old-token")
    auth.check("bearer new-token ")
    for header in (None, "", "Bearer", "Bearer ", "old-token", "Basic old-token", "Bearer old", "Bearer new-token2"):
        with pytest.raises(ApiError) as info:
            auth.check(header)
        assert info.value.status == 401 and info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert BearerAuth(()).open
    BearerAuth(()).check(None)  # no token configured: open (the ingress logs a warning at start)


def test_admission_answers_503_with_retry_after_beyond_the_limit() -> None:
    async def scenario() -> None:
        admission = Admission(limit=2, retry_after_s=3)
        async with admission.slot(), admission.slot():
            with pytest.raises(ApiError) as info:
                async with admission.slot():
                    pass
            assert info.value.status == 503 and info.value.headers == {"Retry-After": "3"}
        async with admission.slot():  # the slots are given back
            assert admission.active == 1
        assert admission.active == 0

    asyncio.run(scenario())


def test_pixel_budget_bounds_the_pixels_decoded_at_once() -> None:
    async def scenario() -> int:
        budget = PixelBudget(100)
        inside, peak = 0, 0

        async def decode(pixels: int) -> None:
            nonlocal inside, peak
            async with budget.hold(pixels):
                inside += pixels
                peak = max(peak, inside)
                await asyncio.sleep(0.01)
                inside -= pixels

        await asyncio.gather(*(decode(pixels) for pixels in (60, 60, 30, 10, 100, 40)))
        assert budget.free == 100
        return peak

    assert asyncio.run(scenario()) <= 100
