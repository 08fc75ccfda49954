from __future__ import annotations

import re

from postlane.tenants.dns_records import sending_domain_records


def test_records_cover_dkim_spf_return_path_and_dmarc() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 392
    records = sending_domain_records(
        domain="acme.com",
        hostname="mail.postlane.test",
        dkim_selector="pl202611",
        dkim_txt=value,
        return_path_subdomain="bounce",
    )
    by_name = {(r.name, r.type): r for r in records}
    dkim = by_name[("pl202611._domainkey.acme.com", "TXT")]
    line = dkim.zone_line()
    assert line.startswith('pl202611._domainkey.acme.com. IN TXT "v=DKIM1; k=rsa; p=')
    # split into 255-octet character-strings that join back to the value
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value
    assert by_name[("bounce.acme.com", "TXT")].value.startswith("v=spf1 a:mail.postlane.test")
    assert by_name[("bounce.acme.com", "MX")].value == "10 mail.postlane.test."
    assert by_name[("_dmarc.acme.com", "TXT")].value.startswith("v=DMARC1; p=none")


def test_ed25519_record_only_when_present() -> None:
    common = {
        "domain": "acme.com",
        "hostname": "h.example",
        "dkim_selector": "s",
        "dkim_txt": "v=DKIM1; k=rsa; p=X",
        "return_path_subdomain": "bounce",
    }
    assert len(sending_domain_records(**common)) == 4  # type: ignore[arg-type]
    with_ed = sending_domain_records(
        **common,  # type: ignore[arg-type]
        ed25519_selector="se",
        ed25519_txt="v=DKIM1; k=ed25519; p=Y",
    )
    assert ("se._domainkey.acme.com", "TXT") in {(r.name, r.type) for r in with_ed}
