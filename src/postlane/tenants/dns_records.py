"""The DNS records a customer publishes before sending from a domain.

Mail from a domain only reaches inboxes when receivers can check it: SPF on
the envelope (return-path) domain, a DKIM key for the signature, DMARC tying
both to the visible From domain, and an MX on the return-path domain so that
bounces come back to Postlane. Records are generated from what is stored, so
what the operator is told to publish is always what Postlane signs with.
"""

from __future__ import annotations

from dataclasses import dataclass

_TXT_CHUNK = 255  # one DNS character-string holds at most 255 octets


@dataclass(frozen=True, slots=True)
class DnsRecord:
    name: str
    type: str
    value: str
    purpose: str

    def zone_line(self) -> str:
        """The record as a line of a BIND zone file (TXT split into 255-octet strings)."""
        if self.type == "TXT":
            chunks = [self.value[i : i + _TXT_CHUNK] for i in range(0, len(self.value), _TXT_CHUNK)]
            data = " ".join(f'"{chunk}"' for chunk in chunks)
        else:
            data = self.value
        return f"{self.name}. IN {self.type} {data}"


def sending_domain_records(
    *,
    domain: str,
    hostname: str,
    dkim_selector: str,
    dkim_txt: str,
    return_path_subdomain: str,
    ed25519_selector: str | None = None,
    ed25519_txt: str | None = None,
) -> list[DnsRecord]:
    """Every record to publish for one sending domain, in the order to publish them."""
    return_path = f"{return_path_subdomain}.{domain}"
    records = [
        DnsRecord(f"{dkim_selector}._domainkey.{domain}", "TXT", dkim_txt, "DKIM public key (RSA)"),
    ]
    if ed25519_selector and ed25519_txt:
        records.append(
            DnsRecord(
                f"{ed25519_selector}._domainkey.{domain}",
                "TXT",
                ed25519_txt,
                "DKIM public key (Ed25519)",
            )
        )
    records += [
        DnsRecord(
            return_path,
            "TXT",
            f"v=spf1 a:{hostname} mx:{hostname} ~all",
            "SPF for the return-path (envelope sender) domain",
        ),
        DnsRecord(return_path, "MX", f"10 {hostname}.", "bounces come back to Postlane"),
        DnsRecord(
            f"_dmarc.{domain}",
            "TXT",
            f"v=DMARC1; p=none; adkim=r; aspf=r; rua=mailto:dmarc-reports@{domain}",
            "DMARC policy (start with p=none, tighten once reports are clean)",
        ),
    ]
    return records
