"""What a server's reply means, in words a customer's IT person can act on.

Why a table: Microsoft 365 and Google answer the same few configuration mistakes with
well-known enhanced status codes (RFC 3463), and the text alone ("Authentication
unsuccessful") does not say whether the password is wrong, SMTP AUTH is switched off,
or basic authentication has been retired. Branch on the enhanced code first and on
the words that Microsoft puts after it second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from crm_core.plugin_api import Scope, set_command

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")

_OAUTH_FIX = (
    "Microsoft 365 is switching basic authentication for SMTP off (default-off from the "
    "end of 2026); send with OAuth (XOAUTH2) instead: "
    "1) in the Entra app registration, add the application permission Office 365 Exchange "
    "Online → SMTP.SendAsApp and grant admin consent; "
    "2) register the app's service principal in Exchange Online: New-ServicePrincipal "
    "-AppId <Client ID> -ObjectId <the enterprise application's Object ID>; "
    "3) give it the mailbox: Add-MailboxPermission -Identity <mailbox> -User <that Object "
    "ID> -AccessRights FullAccess; "
    "4) set smtp.auth xoauth2 with the app's Client ID, Tenant ID and Client secret "
    "(the system settings), and Test connection."
)


@dataclass(frozen=True)
class Hint:
    """What the reply means and what to do.

    ``account_wide``: the reply is about the sending account or installation (login,
    relay, send-as), not about one message, so every message would fail the same way.
    """

    meaning: str
    fix: str
    account_wide: bool = True


def enhanced_code(text: str) -> str:
    """The enhanced status code (e.g. "5.7.139") in a reply, or ""."""
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else ""


def reply_code(code: int, text: str) -> str:
    """The basic and enhanced code together, e.g. "535 5.7.139", for support."""
    enhanced = enhanced_code(text)
    return f"{code} {enhanced}".strip() if code else enhanced


def explain(code: int, text: str, oauth: bool = False, email: str = "") -> Hint | None:
    """A hint for a reply we recognise, or None; ``oauth``: the login used XOAUTH2.

    ``email`` is the sending user's address, so that a fix is a command to type.
    """
    enhanced = enhanced_code(text)
    lowered = text.lower()
    if enhanced == "5.7.139":
        return _m365_auth_blocked(lowered)
    if enhanced == "5.7.30" or "basic authentication is not supported" in lowered:
        return Hint(
            "Microsoft 365 no longer accepts basic authentication (password) for SMTP.", _OAUTH_FIX
        )
    if enhanced == "5.7.57":
        return Hint(
            "The server says the client is not authenticated (Microsoft 365: 5.7.57).",
            "Set smtp.auth to password or xoauth2 with valid credentials; a relay that "
            "accepts mail without login needs a connector for this server's address.",
        )
    if enhanced == "5.7.60" or "send as" in lowered:
        return Hint(
            "The account may not send with this From address (no Send As permission).",
            "Send with the mailbox's own address, or have the administrator grant Send As "
            "for it (Microsoft 365: Exchange admin center → mailbox → delegation).",
        )
    if ("starttls" in lowered and "required" in lowered) or "must issue a starttls" in lowered:
        return Hint(
            "The server accepts mail only over an encrypted connection.",
            "Set smtp.security starttls (port 587) or ssl (port 465).",
        )
    if code == 530 or "authentication required" in lowered:
        return Hint(
            "The server accepts mail only after a login.",
            "Set smtp.auth password (with each user's smtp.username and smtp.password) "
            "or xoauth2 for Microsoft 365.",
        )
    if enhanced in ("5.7.8", "5.7.3") or code == 535:
        return _credentials_hint(oauth, email)
    if enhanced == "5.7.9" or "application-specific password" in lowered:
        return Hint(
            "Google requires an app password for this account.",
            "Create an app password in the Google account (Security → App passwords) "
            "and save it as smtp.password, or use OAuth.",
        )
    if enhanced == "5.7.708" or enhanced == "5.7.64":
        return Hint(
            "Microsoft 365 does not accept mail from this server's IP address "
            f"({enhanced}: relay not allowed).",
            "Log in with a mailbox (smtp.auth password or xoauth2), or ask the tenant "
            "administrator for an inbound connector for this server's address.",
        )
    if enhanced == "5.1.8":
        return Hint(
            "Microsoft 365 has blocked this mailbox from sending (5.1.8, bad outbound sender).",
            "The tenant administrator must release the user in the Restricted entities "
            "page of the Microsoft Defender portal.",
        )
    return _message_hint(enhanced)


def _message_hint(enhanced: str) -> Hint | None:
    """Replies about one message or recipient (the account itself is fine)."""
    if enhanced in ("5.1.1", "5.1.10", "5.4.1"):
        return Hint(
            "The recipient's address does not exist at the receiving server.",
            "Check the address for typos or ask the recipient for the right one.",
            account_wide=False,
        )
    if enhanced == "5.2.2":
        return Hint(
            "The recipient's mailbox is full.",
            "Ask the recipient to make room, or send later.",
            account_wide=False,
        )
    if enhanced in ("5.3.4", "5.2.3"):
        return Hint(
            "The message is larger than the server accepts.",
            "Send smaller attachments, or share large files by link.",
            account_wide=False,
        )
    return None


def _m365_auth_blocked(lowered: str) -> Hint:
    if "disabled for the tenant" in lowered:
        meaning = "SMTP AUTH is disabled for the whole Microsoft 365 tenant (5.7.139)."
        fix = (
            "Ask the tenant administrator to allow SMTP AUTH "
            "(Set-TransportConfig -SmtpClientAuthenticationDisabled $false) or enable it "
            "for this mailbox; " + _OAUTH_FIX
        )
    elif "disabled for the mailbox" in lowered:
        meaning = "SMTP AUTH is disabled for this mailbox (5.7.139)."
        fix = (
            "Enable 'Authenticated SMTP' for the mailbox (Microsoft 365 admin center → "
            "Users → Mail → Manage email apps)."
        )
    elif "security defaults" in lowered or "did not meet the criteria" in lowered:
        meaning = (
            "Microsoft 365 security defaults or Conditional Access block basic "
            "authentication for this account (5.7.139)."
        )
        fix = _OAUTH_FIX
    elif "basic authentication is disabled" in lowered:
        meaning = "Basic authentication is disabled for this tenant (5.7.139)."
        fix = _OAUTH_FIX
    elif "locked" in lowered:
        meaning = "The account is locked (5.7.139)."
        fix = "Ask the administrator to unlock the account, then try again."
    else:
        meaning = (
            "Microsoft 365 refused the login: wrong username or password, or SMTP AUTH "
            "disabled for the mailbox or tenant (5.7.139)."
        )
        fix = (
            "Check smtp.username (the full address) and smtp.password; if they are right, "
            "enable Authenticated SMTP for the mailbox. " + _OAUTH_FIX
        )
    return Hint(meaning, fix)


def _credentials_hint(oauth: bool, email: str) -> Hint:
    if oauth:
        return Hint(
            "The server refused the OAuth token.",
            "The Entra app needs the Office 365 Exchange Online permission SMTP.SendAsApp "
            "with admin consent, a service principal registered in Exchange "
            "(New-ServicePrincipal) and permission on the mailbox.",
        )
    return Hint(
        "The server refused the username or password.",
        "Check smtp.username (usually the full e-mail address) and save the password "
        f"again: {set_command(email, 'smtp.password', Scope.USER)}",
    )
