"""The server's model service in-process (serve/service.py ModelService): the work meter that bounds growth,
and the between-lesion checks inside tracking. The request plumbing around it runs through a real server in
test_serve_load.py; here the service is driven directly so that growth and the check order are exact.

The segmentation network is replaced by a thresholding one (foreground = CT above the normalisation mean), so
a bright ellipsoid longer than the patch is known to make growth add tiles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.model.tiny_model import write_random_checkpoint
from LesionLocatorLib.serve.config import ServerConfig
from LesionLocatorLib.serve.errors import ApiError
from LesionLocatorLib.serve.service import Abandoned, ModelService


class Threshold(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 4.0 * x[:, :1]
        return torch.cat([torch.zeros_like(fg), fg], 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("svc_ckpt"), patch_size=(32, 32, 32),
                                   spacing=(1.0, 1.0, 1.0), features_per_stage=(2, 4, 8), n_blocks_per_stage=(1, 1, 1),
                                   folds=(0,), seed=3)


def service(checkpoint, **cfg) -> ModelService:
    s = ModelService(ServerConfig(checkpoint=str(checkpoint), device="cpu", warmup=False, **cfg))
    s.load()
    for kind in ("point", "box"):
        if s.model.has(kind):
            s.model.prompt_model(kind).networks = [Threshold()]
    return s


def long_lesion() -> Volume:
    """A bright ellipsoid 3 patches long in x (1 mm grid = the model's): a click's first patch cannot hold it."""
    zz, yy, xx = np.indices((40, 40, 120))
    inside = ((zz - 20) / 10) ** 2 + ((yy - 20) / 10) ** 2 + ((xx - 60) / 48) ** 2 < 1
    return Volume(np.where(inside, 200, -500).astype(np.int16), spacing=(1.0, 1.0, 1.0))


CLICK = {"point": [20, 20, 60]}


def test_growth_counts_against_max_work(checkpoint):
    image = long_lesion()
    free = service(checkpoint, max_work=10_000)
    before = free.model.network_passes
    res = free.segment(("s", "h"), image, {"1": CLICK}, [], None, False, True, False)
    grown_passes = free.model.network_passes - before
    assert res.lesions[1].mask.sum() > 0 and grown_passes > 3, grown_passes  # growth added tiles
    # the estimate (1 tile per click) admits two clicks; growth makes the first overrun a cap of 3 passes:
    # the request stops before its next tile with a 413 that says what ran
    capped = service(checkpoint, max_work=3)
    before = capped.model.network_passes
    with pytest.raises(ApiError) as e:
        capped.segment(("s", "h"), image, {"1": CLICK, "2": {"point": [20, 20, 30]}}, [], None, False, True, False)
    assert e.value.status == 413 and e.value.code == "too_much_work"
    assert e.value.detail == {"ran": 4, "limit": 3}
    assert capped.model.network_passes - before == 4  # one tile past the cap, then nothing
    # without growth the same request fits: two single-patch clicks
    res = capped.segment(("s", "h"), image, {"1": CLICK, "2": {"point": [20, 20, 30]}}, [], None, False, False, False)
    assert sorted(res.lesions) == [1, 2]


def test_tracking_checks_between_lesions(checkpoint):
    """The request's check (client present, deadline, work) runs inside tracking between lesions: a client
    that leaves after the first lesion stops the job there."""
    svc = service(checkpoint, max_work=10_000, grow=False)
    image = long_lesion()
    prompts = {str(i): {"point": [20, 20, x]} for i, x in enumerate((30, 45, 60, 75, 90), start=1)}
    calls = []

    def check() -> None:
        calls.append(svc.model.network_passes)
        if len(calls) > 3:
            raise Abandoned("the client disconnected")

    with pytest.raises(Abandoned):
        svc.track(image, [image, image], prompts, [], False, "classical", "segment", None, False, None, check=check)
    assert len(calls) == 4
    # full run for comparison: every lesion at the baseline and in both follow-ups
    full = []
    svc.track(image, [image, image], prompts, [], False, "classical", "segment", None, False, None,
              check=lambda: full.append(1))
    assert len(full) > len(calls)
