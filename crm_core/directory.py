"""Persons and users: the services behind ``crm persons`` and ``crm users``.

Services take the caller's Session and never commit; the caller frames the unit of
work, so adding a person and queueing a mail to them can be one transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from crm_core.errors import MailValidationError, NotFoundError, Problem, ValidationError
from crm_core.mail.addresses import header_problem, parse_address
from crm_core.mail.policy import db_now
from crm_core.models import Person, Role, User
from crm_core.settings import private_domains_allowed
from crm_core.signals import emit_after_commit


def normalise_email(raw: str, field: str, allow_private: bool = False) -> str:
    """A validated, lower-cased address for identity lookups, or ValidationError.

    ``allow_private`` follows mail.allow_private_domains: on an on-premises network
    the users and persons of corp.local must be in the register to send and receive.
    """
    try:
        return parse_address(raw, allow_private=allow_private).email.lower()
    except MailValidationError as exc:
        raise ValidationError(f"Invalid {field}", exc.problems) from None


def _name_problem(name: str) -> Problem | None:
    problem = header_problem(name, "name")
    if problem is not None:
        return problem
    return None if name.strip() else Problem("name", "is required")


def _check_name(name: str) -> None:
    problem = _name_problem(name)
    if problem is not None:
        raise ValidationError("Invalid name", [problem])


def add_person(session: Session, email: str, name: str, mobile: str | None = None) -> Person:
    """Add a contact to the register; the e-mail must be valid and not yet registered."""
    address = normalise_email(email, "person e-mail", private_domains_allowed(session))
    _check_name(name)
    if session.scalar(select(Person).where(Person.email == address)) is not None:
        raise ValidationError(
            "Person already exists", [Problem(address, "a person with this e-mail is registered")]
        )
    person = Person(
        email=address,
        name=name.strip(),
        mobile=(mobile or "").strip() or None,
        created_at=db_now(session),
    )
    session.add(person)
    session.flush()
    emit_after_commit(session, "person-created", person_id=person.id, email=person.email)
    return person


def find_person(session: Session, email: str) -> Person:
    """The person with this e-mail, or NotFoundError."""
    person = session.scalar(select(Person).where(Person.email == email.strip().lower()))
    if person is None:
        raise NotFoundError(f"no person with e-mail {email!r}; see `crm persons list`")
    return person


def list_persons(session: Session) -> Sequence[Person]:
    """Every person, by name."""
    return session.scalars(select(Person).order_by(Person.name, Person.id)).all()


def add_user(
    session: Session, email: str, name: str, product_line: str, admin: bool = False
) -> User:
    """Add a CRM user; ``email`` becomes the sender address of their mail."""
    address = normalise_email(email, "user e-mail", private_domains_allowed(session))
    _check_name(name)
    if session.scalar(select(User).where(User.email == address)) is not None:
        raise ValidationError(
            "User already exists", [Problem(address, "a user with this e-mail exists")]
        )
    user = User(
        email=address,
        name=name.strip(),
        product_line=product_line,
        role=(Role.ADMIN if admin else Role.USER).value,
        created_at=db_now(session),
    )
    session.add(user)
    session.flush()
    emit_after_commit(session, "user-created", user_id=user.id, email=user.email)
    return user


def find_user(session: Session, email: str) -> User:
    """The user with this e-mail, or NotFoundError."""
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise NotFoundError(f"no user with e-mail {email!r}; see `crm users list`")
    return user


def list_users(session: Session) -> Sequence[User]:
    """Every user, by product line then e-mail."""
    return session.scalars(select(User).order_by(User.product_line, User.email)).all()


def update_user(
    session: Session,
    user: User,
    *,
    name: str,
    email: str,
    product_line: str,
    role: str,
    product_lines: Collection[str],
) -> list[str]:
    """Change a user's Basic tab: name, sender e-mail, product line and role.

    Every value is checked before anything changes, and every problem is reported at
    once (keyed ``name``, ``email``, ``product_line``, ``role``), so a form can show
    each next to its field. ``product_lines`` are the configuration's. Returns the
    names of the fields that changed. Never commits.
    """
    address, problems = _email_for(session, user, email)
    name_problem = _name_problem(name)
    if name_problem is not None:
        problems.append(Problem("name", name_problem.message, name_problem.fix))
    if product_line not in product_lines:
        problems.append(
            Problem(
                "product_line",
                f"{product_line!r} is not a product line; the configuration has: "
                f"{', '.join(product_lines)}",
            )
        )
    problems.extend(_role_problems(session, user, role))
    if problems:
        raise ValidationError("Invalid user", problems)
    wanted = {"name": name.strip(), "email": address, "product_line": product_line, "role": role}
    changed = [field for field, value in wanted.items() if getattr(user, field) != value]
    for field in changed:
        setattr(user, field, wanted[field])
    session.flush()
    return changed


def _email_for(session: Session, user: User, email: str) -> tuple[str, list[Problem]]:
    """The normalised new address, and why it cannot be this user's (if it cannot)."""
    try:
        address = normalise_email(email, "user e-mail", private_domains_allowed(session))
    except ValidationError as exc:
        return "", [Problem("email", p.message, p.fix) for p in exc.problems]
    taken = session.scalar(select(User).where(User.email == address, User.id != user.id))
    if taken is not None:
        return address, [Problem("email", f"another user already has the e-mail {address}")]
    return address, []


def _role_problems(session: Session, user: User, role: str) -> list[Problem]:
    """A role must be known, and the last administrator cannot stop being one."""
    roles = [r.value for r in Role]
    if role not in roles:
        return [Problem("role", f"{role!r} is not a role; use one of: {', '.join(roles)}")]
    if user.role == Role.ADMIN.value and role != Role.ADMIN.value:
        others = session.scalar(
            select(User.id).where(User.role == Role.ADMIN.value, User.id != user.id).limit(1)
        )
        if others is None:
            return [
                Problem(
                    "role",
                    "this is the only administrator; make another user an administrator first",
                )
            ]
    return []
