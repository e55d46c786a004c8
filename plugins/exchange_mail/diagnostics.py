"""Test connection ("Testa anslutning"): a ladder of named steps, green or red.

Why a ladder: the guide's single red line "TestConnection error Credentials" covers a
dozen different mistakes (wrong Client ID, Secret ID pasted instead of the Value, an
expired secret, an alias instead of the primary address, missing admin consent …).
Each rung checks one thing and names the cause and the fix, and the summary keeps the
guide's wording where the guide uses it, followed by the precise cause:

1. settings — complete and valid (plus warnings: secret expiry, a secret shaped like
   a Secret ID, username vs domain, EWS retirement on Exchange Online);
2. token — Entra ID issues an app-only token (skipped with a password);
3. mailbox — EWS: the server answers, signs in and lets us act as the mailbox (one
   GetFolder); Graph: first "permission" (Mail.Send in the token's roles; a token
   without any Mail.* role is yellow, as RBAC for Applications grants mail permissions
   in Exchange Online and not in the token), then the user looked up (a warning only
   when the app may not read users), then the "lookup" in Sent Items (the read
   permission, and the mailbox inside the app's scope). With a token without mail
   roles, the lookup first asks Exchange whether the app may send as the mailbox (a
   sendMail without recipients, which can never go) and is red when it may not;
4. sync — "Sync with Exchange" is ticked.

Nothing is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from crm_core.plugin_api import (
    CERTIFICATE,
    EXCHANGE_SCOPE,
    ConnectionReport,
    ConnectionStep,
    Problem,
    Resources,
    SenderAccount,
    StepStatus,
    expiry_notices,
    is_guid,
    token_client,
)
from exchange_mail.errors import MAIL_SEND_FIX, LookupRefused, scope_fix, token_roles
from exchange_mail.graph_errors import rbac_only, rbac_scope_fix
from exchange_mail.settings import (
    GUIDE_CREDENTIALS,
    MAIL_SEND,
    READ_PERMISSION,
    READ_ROLES,
    SECRET_ID_WARNING,
    TRANSPORT,
    USERNAME,
    Api,
    AuthMode,
    ExchangeSettings,
    domain_mismatch,
    ews_retirement_notice,
    graph_notice,
    resolve,
)
from exchange_mail.settings import SYNC as SYNC_KEY

CONNECTED = "Connected to Exchange"

SETTINGS, TOKEN, MAILBOX, SYNC = "settings", "token", "mailbox", "sync"


def run(
    account: SenderAccount, resources: Resources, today: date, found: Sequence[Problem]
) -> ConnectionReport:
    """The whole ladder for one account.

    ``found`` is the core's answer to what stops the account from sending (our
    ``sending_problems`` among it); the settings rung shows it, except the unticked
    "Sync with Exchange", which has its own rung at the end.
    """
    settings = resolve(account)
    steps: list[ConnectionStep] = []
    failures: list[tuple[ConnectionStep, bool]] = []  # (step, guide's "Credentials" case)

    problems = [p for p in found if p.key != SYNC_KEY]
    unticked = next((p for p in found if p.key == SYNC_KEY), None)
    if problems:
        step = ConnectionStep(
            SETTINGS,
            StepStatus.FAILED,
            "; ".join(p.message for p in problems),
            "; ".join(p.fix for p in problems),
        )
        failures.append((step, False))
    else:
        step = ConnectionStep(SETTINGS, StepStatus.OK, _describe(settings))
    steps.append(step)
    steps.extend(_warnings(account, settings, today))

    roles: tuple[str, ...] | None = None
    if problems:
        steps.append(ConnectionStep(TOKEN, StepStatus.SKIPPED, "settings incomplete"))
    elif settings.mode is AuthMode.OAUTH and settings.app is not None:
        token_steps, roles, failed = _token_steps(settings, resources)
        steps.extend(token_steps)
        if failed is not None:
            failures.append((failed, True))
    else:
        steps.append(
            ConnectionStep(
                TOKEN,
                StepStatus.SKIPPED,
                f"OAuth is not set up; signing in with {settings.mailbox}'s password "
                f"({settings.onprem_auth.upper()})",
            )
        )

    def add(step: ConnectionStep, credentials: bool) -> None:
        steps.append(step)
        if step.status is StepStatus.FAILED:
            failures.append((step, credentials))

    if settings.api is Api.GRAPH and not failures:
        add(*_permission_step(settings, roles))
    if failures:
        steps.append(ConnectionStep(MAILBOX, StepStatus.SKIPPED, "an earlier step failed"))
    elif settings.api is Api.GRAPH:
        add(*_graph_mailbox_step(account, settings, resources))
        if not failures and rbac_only(roles):
            add(*_rbac_lookup_step(settings, resources))
        elif not failures:
            add(*_graph_lookup_step(settings, resources, roles))
    else:
        add(*_ews_mailbox_step(settings, resources, roles))

    if unticked is None:
        steps.append(ConnectionStep(SYNC, StepStatus.OK, "'Sync with Exchange' is ticked"))
    else:
        step = ConnectionStep(SYNC, StepStatus.FAILED, unticked.message, unticked.fix)
        steps.append(step)
        failures.append((step, False))

    return ConnectionReport(TRANSPORT, _summary(failures), tuple(steps))


def _token_steps(
    settings: ExchangeSettings, resources: Resources
) -> tuple[list[ConnectionStep], tuple[str, ...] | None, ConnectionStep | None]:
    """The token rung: which credential Entra ID accepted, and each one it refused.

    Returns the steps, the token's roles, and the failed step (None when a token came).
    """
    assert settings.app is not None
    app = settings.app
    attempts = token_client(resources, app).attempts(_scope(settings))
    refused = [a for a in attempts if a.error is not None]
    accepted = next((a for a in attempts if a.error is None), None)
    steps: list[ConnectionStep] = []
    if accepted is None:
        first = refused[0].error
        assert first is not None
        detail = first.message + "".join(
            f" Also refused: {a.credential.describe()}: {a.error.message}"
            for a in refused[1:]
            if a.error is not None
        )
        step = ConnectionStep(TOKEN, StepStatus.FAILED, detail, first.fix)
        return [step], None, step
    used = accepted.credential
    detail = (
        f"Entra ID issued an app-only token for Client ID {app.client_id} in tenant "
        f"{app.tenant} with {used.describe()}"
    )
    if not used.is_certificate:
        detail += (
            "; Microsoft recommends a certificate instead of a client secret for production "
            f"(crm settings set {CERTIFICATE} < app.pem)"
        )
    steps.append(ConnectionStep(TOKEN, StepStatus.OK, detail))
    for attempt in refused:
        assert attempt.error is not None
        steps.append(
            ConnectionStep(
                "refused credential",
                StepStatus.WARNING,
                f"{attempt.credential.describe()} was refused, {used.describe()} was used "
                f"instead: {attempt.error.message}",
                attempt.error.fix,
            )
        )
    return steps, token_roles(accepted.token), None


def _summary(failures: list[tuple[ConnectionStep, bool]]) -> str:
    if not failures:
        return CONNECTED
    step, credentials = failures[0]
    if credentials:
        return f"{GUIDE_CREDENTIALS}: {step.detail}"
    if step.name == SYNC:
        return f"Cannot send via Exchange: {step.detail}"
    return f"Not connected to Exchange: {step.detail}"


def _describe(settings: ExchangeSettings) -> str:
    if settings.mode is AuthMode.OAUTH and settings.app is not None:
        how = (
            f"app-only OAuth (Client ID {settings.app.client_id}, tenant {settings.app.tenant}, "
            f"authority {settings.app.authority}) "
            + ("sending as " if settings.api is Api.GRAPH else "impersonating ")
            + settings.mailbox
        )
    else:
        how = f"{settings.mailbox} signs in with a password ({settings.onprem_auth.upper()})"
    if settings.api is Api.GRAPH and settings.cloud is not None:
        chosen = graph_notice(settings.cloud, settings.graph_url)
        return f"{chosen}; {how}"
    server = settings.graph_root if settings.api is Api.GRAPH else settings.url
    return f"{server} via {'Microsoft Graph' if settings.api is Api.GRAPH else 'EWS'}, {how}"


def _warnings(
    account: SenderAccount, settings: ExchangeSettings, today: date
) -> list[ConnectionStep]:
    steps: list[ConnectionStep] = []
    if settings.app is not None:
        for notice in expiry_notices({**account.system, **account.user}, today):
            steps.append(ConnectionStep("credential expiry", StepStatus.WARNING, notice.message))
        if _looks_like_secret_id(settings):
            steps.append(ConnectionStep("client secret", StepStatus.WARNING, SECRET_ID_WARNING))
    mismatch = domain_mismatch(settings.mailbox, settings.domain)
    if mismatch:
        steps.append(ConnectionStep("username and domain", StepStatus.WARNING, mismatch))
    retirement = ews_retirement_notice(settings.url) if settings.api is Api.EWS else None
    if retirement:
        steps.append(ConnectionStep("EWS retirement", StepStatus.WARNING, retirement))
    return steps


def _looks_like_secret_id(settings: ExchangeSettings) -> bool:
    secret = settings.app.secret if settings.app is not None else None
    return secret is not None and is_guid(secret.reveal())


def _scope(settings: ExchangeSettings) -> str:
    if settings.api is Api.GRAPH:
        from exchange_mail.graph import scope_for

        return scope_for(settings.graph_url)
    return EXCHANGE_SCOPE


# --- the mailbox rung, EWS --------------------------------------------------------


def _ews_mailbox_step(
    settings: ExchangeSettings, resources: Resources, roles: tuple[str, ...] | None
) -> tuple[ConnectionStep, bool]:
    """One GetFolder of the mailbox root: proves endpoint, sign-in and impersonation.

    An uncached mailbox, so every test really asks the server.
    """
    from exchangelib.folders import Root

    from exchange_mail import ews
    from exchange_mail.ews_errors import classify, sharpen

    mailbox: ews.EwsMailbox | None = None
    try:
        mailbox = ews.new_mailbox(settings, resources)
        account = mailbox.account
        mailbox.call(lambda: Root.get_distinguished(account=account))
    except Exception as exc:
        found = sharpen(classify(exc, settings), roles)
        return ConnectionStep(
            MAILBOX, StepStatus.FAILED, found.detail, found.fix
        ), found.credentials
    finally:
        if mailbox is not None:
            mailbox.close()
    if settings.mode is AuthMode.OAUTH:
        detail = f"mailbox {settings.mailbox} found; the app may act as it (impersonation)"
    else:
        detail = f"signed in to mailbox {settings.mailbox}"
    return ConnectionStep(MAILBOX, StepStatus.OK, detail), False


# --- the permission and mailbox rungs, Graph ----------------------------------------


def _permission_step(
    settings: ExchangeSettings, roles: tuple[str, ...] | None
) -> tuple[ConnectionStep, bool]:
    """Mail.Send in the token's roles, when the token has mail roles at all: without
    any, RBAC for Applications may grant it in Exchange, and the lookup step decides."""
    if roles is None:
        return ConnectionStep("permission", StepStatus.SKIPPED, "the token cannot be read"), False
    if MAIL_SEND in roles:
        return (
            ConnectionStep("permission", StepStatus.OK, "the app holds Mail.Send (application)"),
            False,
        )
    if rbac_only(roles):
        return _rbac_permission_step(settings, roles), False
    detail = f"the token lacks Mail.Send (it holds {', '.join(roles)})"
    return ConnectionStep("permission", StepStatus.FAILED, detail, MAIL_SEND_FIX + "."), True


def _rbac_permission_step(settings: ExchangeSettings, roles: tuple[str, ...]) -> ConnectionStep:
    """Yellow: no mail role in the token, as with RBAC for Applications alone."""
    assert settings.app is not None
    held = f" (it holds {', '.join(roles)})" if roles else ""
    return ConnectionStep(
        "permission",
        StepStatus.WARNING,
        f"the token carries no Microsoft Graph mail permissions{held}: this is expected with "
        "RBAC for Applications, where Exchange Online grants Mail.Send per mailbox and the "
        f"token shows nothing of it; the lookup step asks Exchange about {settings.mailbox}",
        "To check, in Exchange Online PowerShell: Test-ServicePrincipalAuthorization "
        f"-Identity {settings.app.client_id} -Resource {settings.mailbox} must show "
        f'"Application {MAIL_SEND}" with InScope True. Without RBAC for Applications: '
        f"{MAIL_SEND_FIX}.",
    )


def _graph_mailbox_step(
    account: SenderAccount, settings: ExchangeSettings, resources: Resources
) -> tuple[ConnectionStep, bool]:
    """Look the user up (needs User.Read.All): the mailbox exists, and the user's e-mail
    (the From) is one of its addresses, which sending needs."""
    from exchange_mail.graph import GraphClient
    from exchange_mail.graph_errors import Answer, classify, classify_answer

    client = GraphClient(settings, resources)
    try:
        response = client.call(
            "GET",
            f"/users/{client.user}",
            params={"$select": "id,mail,userPrincipalName,proxyAddresses"},
        )
    except Exception as exc:
        found = classify(exc, settings)
        return ConnectionStep(
            MAILBOX, StepStatus.FAILED, found.detail, found.fix
        ), found.credentials
    if response.status_code == 200:
        return _sends_as(account, settings, response.json()), False
    answer = Answer.of(response)
    if response.status_code == 403 and answer.code == "Authorization_RequestDenied":
        return (
            ConnectionStep(
                MAILBOX,
                StepStatus.WARNING,
                f"the app may not read users (no User.Read.All), so neither {settings.mailbox} "
                f"nor whether it may send as {account.email} could be checked; the first mail "
                "will show",
                "Optional: grant Microsoft Graph → User.Read.All (application) for this check.",
            ),
            False,
        )
    found = classify_answer(answer, settings)
    return ConnectionStep(MAILBOX, StepStatus.FAILED, found.detail, found.fix), found.credentials


def mailbox_addresses(user: dict[str, object]) -> list[str]:
    """A user's mail addresses as Graph lists them: ``mail`` and the SMTP proxyAddresses."""
    found = [str(user.get("mail") or "")]
    proxies = user.get("proxyAddresses")
    for proxy in proxies if isinstance(proxies, list) else []:
        kind, _, address = str(proxy).partition(":")
        if kind.lower() == "smtp":
            found.append(address)
    return [a.lower() for a in dict.fromkeys(found) if a]


def _sends_as(
    account: SenderAccount, settings: ExchangeSettings, user: dict[str, object]
) -> ConnectionStep:
    """Green when the user's e-mail is an address of the mailbox; red (with them) if not."""
    addresses = mailbox_addresses(user)
    if account.email.lower() in addresses:
        return ConnectionStep(
            MAILBOX,
            StepStatus.OK,
            f"Microsoft Graph knows the user {settings.mailbox}, and {account.email} is one "
            "of its addresses",
        )
    return ConnectionStep(
        MAILBOX,
        StepStatus.FAILED,
        f"the mailbox {settings.mailbox} may not send as {account.email}: its addresses are "
        f"{', '.join(addresses) or '(none)'}, so Exchange would refuse each mail "
        "(ErrorSendAsDenied)",
        f"Make the user's e-mail (tab Basic) one of those addresses, or set {USERNAME} to the "
        f"mailbox that owns {account.email}; or the Exchange administrator grants the mailbox "
        f"Send As on {account.email} (Add-RecipientPermission).",
    )


LOOKUP = "lookup"
PROBE_ID = "<crm-test-connection@crm.invalid>"
"""A Message-ID no mail has: the lookup asks what reconciling asks, and finds nothing."""


def _graph_lookup_step(
    settings: ExchangeSettings, resources: Resources, roles: tuple[str, ...] | None
) -> tuple[ConnectionStep, bool]:
    """The reconcile lookup, once: the read permission, and the mailbox inside the app's
    scope (what sending meets: a mailbox outside it is refused with the same 403)."""
    from exchange_mail.graph import GraphClient, in_folder
    from exchange_mail.graph_errors import classify

    client = GraphClient(settings, resources)
    try:
        in_folder(client, "sentitems", PROBE_ID)
    except LookupRefused as refused:
        return _lookup_refused(settings, roles, refused)
    except Exception as exc:
        found = classify(exc, settings)
        return ConnectionStep(LOOKUP, StepStatus.FAILED, found.detail, found.fix), False
    return (
        ConnectionStep(
            LOOKUP,
            StepStatus.OK,
            f"the app may look in {settings.mailbox}'s Sent Items ({READ_PERMISSION}), so the "
            "mailbox is inside its scope and a mail whose answer is lost can be settled",
        ),
        False,
    )


def _rbac_lookup_step(
    settings: ExchangeSettings, resources: Resources
) -> tuple[ConnectionStep, bool]:
    """The token holds no mail role, so Exchange decides: first whether the app may send
    as the mailbox (red when not: out of the app's RBAC scope), then the reconcile
    lookup (yellow when the app may send but not read)."""
    from exchange_mail.graph import GraphClient, in_folder, send_scope
    from exchange_mail.graph_errors import classify, classify_answer

    client = GraphClient(settings, resources)
    try:
        answer = send_scope(client)
    except Exception as exc:
        found = classify(exc, settings)
        return ConnectionStep(LOOKUP, StepStatus.FAILED, found.detail, found.fix), False
    if answer.status == 403:
        return _out_of_rbac_scope(settings, answer.code), True
    if not (200 <= answer.status < 300 or answer.code == "ErrorInvalidRecipients"):
        found = classify_answer(answer, settings)
        return ConnectionStep(LOOKUP, StepStatus.FAILED, found.detail, found.fix), found.credentials
    try:
        in_folder(client, "sentitems", PROBE_ID)
    except LookupRefused as refused:
        if refused.status == 403:
            return _rbac_sends_only(settings), False
        return ConnectionStep(LOOKUP, StepStatus.FAILED, f"the lookup failed: {refused}"), False
    except Exception as exc:
        found = classify(exc, settings)
        return ConnectionStep(LOOKUP, StepStatus.FAILED, found.detail, found.fix), False
    return (
        ConnectionStep(
            LOOKUP,
            StepStatus.OK,
            f"Exchange Online lets the app send as {settings.mailbox} and look in its Sent "
            f"Items ({READ_PERMISSION}): RBAC for Applications takes the mailbox into the "
            "app's scope, and a mail whose answer is lost can be settled",
        ),
        False,
    )


def _out_of_rbac_scope(settings: ExchangeSettings, code: str) -> ConnectionStep:
    """Red: Exchange refuses the app the mailbox, and the token holds no mail role."""
    assert settings.app is not None
    return ConnectionStep(
        LOOKUP,
        StepStatus.FAILED,
        f"Exchange Online refuses the app access to {settings.mailbox} (HTTP 403 {code}): "
        "the token carries no mail permissions, so RBAC for Applications decides, and the "
        f'mailbox is outside the management scope of the app\'s "Application {MAIL_SEND}" '
        "role assignment (or the app has none), so every mail would be refused",
        f"{rbac_scope_fix(settings.mailbox, settings.app.client_id)}; then Test connection again.",
    )


def _rbac_sends_only(settings: ExchangeSettings) -> ConnectionStep:
    """Yellow: inside the Mail.Send scope, but no read role assignment takes it in."""
    assert settings.app is not None
    return ConnectionStep(
        LOOKUP,
        StepStatus.WARNING,
        f"Exchange Online lets the app send as {settings.mailbox} (the mailbox is inside "
        f'the scope of "Application {MAIL_SEND}"), but not read its mail: no "Application '
        f'{READ_PERMISSION}" role assignment takes it in, so sending works, but a mail whose '
        "answer is lost cannot be settled and stays unknown",
        f"In Exchange Online PowerShell: New-ManagementRoleAssignment -App "
        f'{settings.app.client_id} -Role "Application {READ_PERMISSION}" '
        f'-CustomResourceScope "<the scope of its Application {MAIL_SEND} assignment>" '
        f"(Test-ServicePrincipalAuthorization -Identity {settings.app.client_id} -Resource "
        f"{settings.mailbox} names that scope).",
    )


def _lookup_refused(
    settings: ExchangeSettings, roles: tuple[str, ...] | None, refused: LookupRefused
) -> tuple[ConnectionStep, bool]:
    """403 without a read permission: yellow (sending works); with one: out of scope, red."""
    readers = set(roles or ()) & READ_ROLES
    if refused.status == 403 and not readers:
        return (
            ConnectionStep(
                LOOKUP,
                StepStatus.WARNING,
                f"the app may not read mail in {settings.mailbox} (no {READ_PERMISSION}): "
                "sending works, but a mail whose answer is lost cannot be settled and stays "
                "unknown; whether the mailbox is inside the app's scope could not be checked",
                f"In Entra → App registrations → API permissions, add Microsoft Graph → "
                f"Application permissions → {READ_PERMISSION}, then click 'Grant admin "
                f"consent' (with RBAC for Applications: the role \"Application "
                f'{READ_PERMISSION}" with the same scope as Mail.Send).',
            ),
            False,
        )
    if refused.status == 403:
        return (
            ConnectionStep(
                LOOKUP,
                StepStatus.FAILED,
                f"Microsoft Graph denies the app access to {settings.mailbox} (HTTP 403 "
                f"{refused.code}) although its token holds {', '.join(sorted(readers))}: the "
                "mailbox is outside the app's scope (RBAC for Applications, or an application "
                "access policy), so sending would be refused too",
                scope_fix(settings.mailbox),
            ),
            True,
        )
    return ConnectionStep(LOOKUP, StepStatus.FAILED, f"the lookup failed: {refused}"), False
