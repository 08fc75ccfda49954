"""The two Python programs of the OMICard SMTP manual, run unchanged against Postlane.

The programs are copied from the manual (section 5.1, "Python Code Sample",
and section 7.2.1, "Do not track opens"). The manual's text lost the
indentation of the ``try``/``except`` bodies in extraction; it is restored
here as Python requires. Then exactly these lines are replaced, and nothing
else: the server and port (127.0.0.1 and the implicit-TLS listener instead of
smtp.itpison.com:465), the user name and password, and the placeholder sender
and recipient addresses (the sender must be at the account's sending domain).

TLS trust: the programs call ``smtplib.SMTP_SSL(smtp_server, smtp_port)``
with no context, and smtplib then uses ``ssl._create_stdlib_context()``,
which does not verify the server's certificate. So they connect to Postlane's
self-signed certificate as they are, and no trust setting is needed (or
would have any effect); that the connection really is TLS is checked from the
stored message. Verifying the certificate is what the smtplib, swaks and curl
tests do.

Each program runs in its own interpreter, as a customer would run it; it
reports failure only by printing, so the test reads what it printed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from integration.harness import PostlaneServer, ServerConfig

SECTION_5_1 = '''\
import smtplib
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
# SMTP server configuration
smtp_server = "smtp.itpison.com"
smtp_port = 465
smtp_username = "sign-in name"
smtp_password = "sign-in password"
# Email content
from_email = "sender email address"
from_name = "sender name"
to_email = "recipient email address"
to_name = "recipient name"
reply_to_email = "reply-to email address" # Added Reply-To address
subject = "Test Mail"
html_body = """
<p>This is a test mail!!</p><br>
"""
# Create message container
msg = MIMEMultipart("alternative")
msg["From"] = f"{from_name} <{from_email}>"
msg["To"] = f"{to_name} <{to_email}>"
msg["Subject"] = subject
msg["Reply-To"] = reply_to_email # Set Reply-To header
# Attach the HTML body
msg.attach(MIMEText(html_body, "html"))
try:
    # Connect to the SMTP server
    server = smtplib.SMTP_SSL(smtp_server, smtp_port)
    server.login(smtp_username, smtp_password)
    # Send email
    server.sendmail(from_email, to_email, msg.as_string())
    server.quit()
    print("Message has been sent")
except Exception as e:
    print(f"Message could not be sent. Error: {str(e)}")
'''

SECTION_7_2_1 = """\
import smtplib
from email.mime.text import MIMEText
# SMTP server configuration
smtp_server = "smtp.itpison.com"
smtp_port = 465
smtp_username = "sign-in name"
smtp_password = "sign-in password"
# Email content
from_email = "test@itpison.com"
to_email = "test@gmail.com"
subject = "Test Sample"
custom_header_key = "X-LinkOption"
custom_header_value = "64"
body = "This is Test Email"
# Create email message
msg = MIMEText(body, "plain")
msg["From"] = from_email
msg["To"] = to_email
msg["Subject"] = subject
msg.add_header(custom_header_key, custom_header_value) # Add custom header
try:
    # Connect to the SMTP server
    server = smtplib.SMTP_SSL(smtp_server, smtp_port)
    server.login(smtp_username, smtp_password)
    # Send email
    server.sendmail(from_email, to_email, msg.as_string())
    server.quit()
    print("Message has been sent")
except Exception as e:
    print(f"Message could not be sent. Error: {str(e)}")
"""


def _prepare(server: PostlaneServer) -> None:
    # Opens are tracked by default for this account, so that the header's
    # "do not track opens" is visible in the stored options.
    server.update_account("acme", track_opens=True)
    server.add_user("acme", "omicard")


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_prepare)


def _configured(program: str, server: PostlaneServer, addresses: dict[str, tuple[str, str]]) -> str:
    """The program with only its connection settings and the given addresses replaced.

    ``addresses`` maps a variable to its value in the manual and the value to use.
    """
    lines = {
        'smtp_server = "smtp.itpison.com"': 'smtp_server = "127.0.0.1"',
        "smtp_port = 465": f"smtp_port = {server.ports.implicit}",
        'smtp_username = "sign-in name"': 'smtp_username = "omicard"',
        'smtp_password = "sign-in password"': (f"smtp_password = {server.passwords['omicard']!r}"),
    }
    out = program.splitlines()
    for old, new in lines.items():
        assert out.count(old) == 1, old
        out[out.index(old)] = new
    for name, (manual, ours) in addresses.items():
        assignment = f'{name} = "{manual}"'
        [index] = [i for i, line in enumerate(out) if line.startswith(assignment)]
        out[index] = out[index].replace(assignment, f'{name} = "{ours}"')
    return "\n".join(out) + "\n"


def _run(program: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_section_5_1_python_code_sample(server: PostlaneServer) -> None:
    program = _configured(
        SECTION_5_1,
        server,
        {
            "from_email": ("sender email address", "news@acme.com"),
            "to_email": ("recipient email address", "reader@example.net"),
            "reply_to_email": ("reply-to email address", "support@acme.com"),
        },
    )
    assert _run(program) == "Message has been sent\n"

    [stored] = server.store.messages_with_subject("Test Mail")
    raw: bytes = stored["raw"]
    assert stored["header_from"] == "news@acme.com"
    assert stored["mail_from"] == "news@acme.com"
    assert stored["smtp_user_id"] is not None
    assert str(stored["tls"]).startswith("TLSv1.")  # SMTP_SSL: TLS from the first byte
    assert b"From: sender name <news@acme.com>" in raw
    assert b"Reply-To: support@acme.com" in raw
    assert b"<p>This is a test mail!!</p><br>" in raw
    assert b"Message-ID: <" in raw  # smtplib sends none: Postlane adds one
    assert [r["address"] for r in server.store.recipients(stored["id"])] == ["reader@example.net"]
    assert stored["options"]["track_opens"] is True  # the account's default


def test_section_7_2_1_do_not_track_opens(server: PostlaneServer) -> None:
    program = _configured(
        SECTION_7_2_1, server, {"from_email": ("test@itpison.com", "test@acme.com")}
    )
    assert "X-LinkOption" in program
    assert _run(program) == "Message has been sent\n"

    [stored] = server.store.messages_with_subject("Test Sample")
    raw: bytes = stored["raw"]
    assert b"This is Test Email" in raw
    assert b"x-linkoption" not in raw.lower()  # a control header: never delivered
    options = stored["options"]
    assert options["track_opens"] is False
    assert options["track_clicks"] is False  # the account's default, untouched
    assert options["raw_masks"] == {"X-LinkOption": 64}
    assert [r["address"] for r in server.store.recipients(stored["id"])] == ["test@gmail.com"]


def test_wrong_password_is_reported_by_the_program(server: PostlaneServer) -> None:
    """The sample swallows errors and prints them: what its user sees on a bad password."""
    program = _configured(
        SECTION_7_2_1, server, {"from_email": ("test@itpison.com", "test@acme.com")}
    ).replace(repr(server.passwords["omicard"]), "'not the password'")
    with server.store.nothing_stored():
        out = _run(program)
    assert out.startswith("Message could not be sent. Error: (535, b'5.7.8 ")
