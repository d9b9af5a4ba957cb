"""The XDP attachment query (libbpf bpf_xdp_query) against lo, a missing link and a loaded lab."""
import pytest

from app.services.kernel.attachment import xdp_attachment


def test_xdp_attachment_without_a_program():
    assert xdp_attachment("lo") is None                       # lo never carries XDP here
    assert xdp_attachment("pw-absent0") is None


@pytest.mark.kernel
def test_xdp_attachment_names_the_program_and_its_mode(lab, tmp_path):
    from app.services.kernel import maps
    from tests.helpers import collect, make_settings
    settings = make_settings(tmp_path, xdp_mode="generic")
    collect(settings, lab)
    pinned = maps.prog_info(f"{settings.general.pin_root}/{lab.interface}/prog").id
    assert xdp_attachment(lab.interface) == (pinned, "generic")
