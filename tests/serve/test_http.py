"""The HTTP pieces of the ingress without a Serve cluster: tokens, bearer auth, admission, the decode budget and the
per-request pixel budget."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Generator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from ray.exceptions import RayActorError

from taxonet.data.transforms import TransformSpec
from taxonet.serve.app import TaxonetIngress
from taxonet.serve.config import IngressSettings
from taxonet.serve.errors import ApiError
from taxonet.auth import load_tokens
from taxonet.serve.http import Admission, BearerAuth, PixelBudget, Upload, check_images
from taxonet.serve.predictor import SERVED_FORMATS, Preprocessor

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


def test_pixel_budget_serves_first_come_first_served() -> None:
    """A large image that asked first is decoded before small ones that asked later, although they would fit
    earlier; a waiter cancelled (client gone) gives up its place and the ones behind it move on."""
    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []
        release_first = asyncio.Event()

        async def decode(name: str, pixels: int, until: asyncio.Event | None = None) -> None:
            async with budget.hold(pixels):
                order.append(name)
                if until is not None:
                    await until.wait()
                else:
                    await asyncio.sleep(0)

        first = asyncio.create_task(decode("first-60", 60, release_first))
        await asyncio.sleep(0)
        large = asyncio.create_task(decode("large-100", 100))
        await asyncio.sleep(0)
        gone = asyncio.create_task(decode("cancelled-90", 90))
        await asyncio.sleep(0)
        smalls = [asyncio.create_task(decode(f"small-{i}", 10)) for i in range(3)]  # 40 free: they would fit
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["first-60"], "images that asked later must not overtake a waiting one"
        gone.cancel()  # its client went away while it waited
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        release_first.set()
        await asyncio.gather(first, large, *smalls)
        assert budget.free == 100 and not budget._waiting
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["first-60", "large-100"]
    assert order[2:] == ["small-0", "small-1", "small-2"]


def _blank(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_request_pixel_budget_is_checked_from_the_headers_before_any_decoding() -> None:
    preprocessor = Preprocessor(TransformSpec(input_size=16), max_pixels=1_000_000, allowed_formats=SERVED_FORMATS)
    at_budget = [Upload(f"{i}.png", _blank(1000, 1000)) for i in range(2)] + [Upload("2.png", _blank(1000, 500))]
    # exactly the budget
    assert check_images(preprocessor, at_budget, max_request_pixels=2_500_000) == [1_000_000, 1_000_000, 500_000]
    over = [*at_budget[:2], Upload("2.png", _blank(1000, 501))]  # one row more
    with pytest.raises(ApiError) as info:
        check_images(preprocessor, over, max_request_pixels=2_500_000)
    assert info.value.status == 413 and info.value.code == "request_too_large"
    with pytest.raises(ApiError) as info:  # one image over the per-image limit is named
        check_images(preprocessor, [at_budget[0], Upload("big.png", _blank(1001, 1000))], max_request_pixels=10**9)
    assert info.value.code == "image_too_large" and info.value.message.startswith("files[1] (big.png): ")


class _NeverAnswers:
    """A model deployment call that never completes (a stuck replica); records its cancellation."""

    def __init__(self) -> None:
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, None]:
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Fails:
    def __await__(self) -> Generator[Any, None, None]:
        raise RayActorError()
        yield


@pytest.mark.timeout(60)  # without the ingress's own timeout this call would wait forever
def test_a_model_call_past_the_timeout_is_a_504_and_a_dead_replica_a_503() -> None:
    ingress = SimpleNamespace(_settings=IngressSettings(classifier_timeout_s=0.2, retry_after_s=2))
    ask = TaxonetIngress.func_or_class._ask
    stuck = _NeverAnswers()
    with pytest.raises(ApiError) as info:
        asyncio.run(ask(ingress, stuck))
    assert info.value.status == 504 and info.value.code == "timeout" and stuck.cancelled
    with pytest.raises(ApiError) as info:
        asyncio.run(ask(ingress, _Fails()))
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "2"}
