"""User accounts: plain functions over a session."""

from __future__ import annotations

from fastapi import HTTPException, status
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.core.security import PasswordHasher
from api.app.users.models import Role, User
from api.app.users.schemas import UserUpdate


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_password_policy(password: str, settings: Settings) -> None:
    if len(password) < settings.password_min_length:
        raise HTTPException(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"Password must be at least {settings.password_min_length} characters long",
        )
    if len(password) > settings.password_max_length:
        raise HTTPException(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"Password must be at most {settings.password_max_length} characters long",
        )


# Built once: every authenticated request loads its user, and building a statement costs more
# CPU than running it.
_USER_BY_ID = select(User).where(User.id == bindparam("b_user_id"))
_USERS_PAGE = select(User).order_by(User.id).offset(bindparam("b_skip")).limit(bindparam("b_limit"))
_COUNT_USERS = select(func.count()).select_from(User)


async def get_user(*, session: AsyncSession, user_id: int) -> User | None:
    return await session.scalar(_USER_BY_ID, {"b_user_id": user_id})


async def get_user_by_email(*, session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == normalize_email(email)))
    return result.scalar_one_or_none()


async def list_users(*, session: AsyncSession, skip: int, limit: int) -> list[User]:
    return list(await session.scalars(_USERS_PAGE, {"b_skip": skip, "b_limit": limit}))


async def count_users(*, session: AsyncSession) -> int:
    return int(await session.scalar(_COUNT_USERS) or 0)


async def create_user(
    *,
    session: AsyncSession,
    hasher: PasswordHasher,
    email: str,
    password: str,
    name: str = "",
    role: Role = Role.user,
) -> User:
    """Creates a user; 409 when the email is taken. The caller checks the password policy."""
    user = User(
        email=normalize_email(email),
        name=name,
        role=role.value,
        hashed_password=await hasher.hash(password),
        is_active=True,
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(
            status_code=status.HTTP_409_CONFLICT, detail="A user with this email already exists"
        ) from None
    await session.refresh(user)
    return user


async def update_user(*, session: AsyncSession, user: User, changes: UserUpdate) -> User:
    for field, value in changes.model_dump(exclude_unset=True).items():
        if value is not None:
            setattr(user, field, value.value if isinstance(value, Role) else value)
    await session.commit()
    await session.refresh(user)
    return user


async def set_password(*, session: AsyncSession, hasher: PasswordHasher, user: User, password: str) -> None:
    session.add(user)  # the signed-in user comes detached from its own lookup
    user.hashed_password = await hasher.hash(password)
    await session.commit()


async def delete_user(*, session: AsyncSession, user: User) -> None:
    await session.delete(user)
    await session.commit()


async def ensure_admin(*, session: AsyncSession, hasher: PasswordHasher, email: str, password: str) -> bool:
    """Creates the first admin when missing; True when it was created."""
    if await get_user_by_email(session=session, email=email) is not None:
        return False
    try:
        await create_user(
            session=session,
            hasher=hasher,
            email=email,
            password=password,
            name="Administrator",
            role=Role.admin,
        )
    except HTTPException:
        return False  # created concurrently by another process
    return True
