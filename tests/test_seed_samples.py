"""The old pipeline's real files (../shared/seed-samples): esmail gives the same lines (DESIGN §5)."""

import pytest

from conftest import SEED
from esmail.chain import AMR_DATA, UNPROCESSABLE, route

pytestmark = pytest.mark.skipif(not SEED.is_dir(), reason="../shared/seed-samples is absent (it sits beside the checkout in CI)")

CONVERTED = ["bryt_multi-sheet.xlsx", "npower-eon_export.xls", "npower-eon_export.xlsx", "tgp-electricity_no-header.xlsx",
             "cr.csv", "cr_empty_lines.csv", "highlands.csv", "highlands-invalid-character.csv", "sheffield_export.csv"]


@pytest.mark.parametrize("name", CONVERTED)
@pytest.mark.parametrize("ascii_only", [False, True])
def test_same_bytes_as_the_old_pipeline(name, ascii_only):
    """These files are ASCII after conversion, so both modes give the old bytes exactly."""
    [out] = route(name, (SEED / "files" / name).read_bytes(), ascii_only)
    assert out.bucket == AMR_DATA
    assert out.data == (SEED / "expected" / f"{name}.normalised.csv").read_bytes()


def test_zip_listing():
    data = (SEED / "files" / "sheffield_export.zip").read_bytes()
    listing = [line.split("\t") for line in (SEED / "expected" / "sheffield_export.zip.listing.txt").read_text().splitlines()]
    outputs = route("sheffield_export.zip", data)
    assert [o.name for o in outputs] == [name for name, _, _ in listing]
    assert outputs[0].data == (SEED / "expected" / f"sheffield_export.zip.{listing[0][0]}.normalised.csv").read_bytes()


def test_renamed_jpeg_is_unprocessable_unchanged():
    data = (SEED / "files" / "npower-eon_image.xlsx").read_bytes()
    [out] = route("npower-eon_image.xlsx", data)
    assert (out.bucket, out.data) == (UNPROCESSABLE, data)
