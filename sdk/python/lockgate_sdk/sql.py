"""SQL on the handler's PostgreSQL database, in the message's own transaction::

    from lockgate_sdk import handler, sql

    @handler
    def handle(msg):
        d = msg.json()
        sql.execute(
            "UPDATE account_balances SET balance = balance + $1 WHERE account = $2",
            [d["amount"], d["account"]],
        )
        for row in sql.query("SELECT account, balance FROM account_balances WHERE balance < 0"):
            print(row["account"], row["balance"])

The database is the PostgreSQL store the handler's runtime.toml table grants
(``[handlers.<name>] sql = "<store>"``). The first statement of a call opens a transaction, every
later one runs in it, and lockgate commits it only when the message is done, together with the
message's idempotency key: a retry, reject, trap, timeout or crash rolls it back, so each message
applies its statements once. Transaction and session control (``BEGIN``, ``COMMIT``, ``SET``,
...) is refused. See docs/handlers/sql.md.

Parameters are ``$1``, ``$2``, ... and a sequence of Python values: ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``, :class:`decimal.Decimal` (numeric), :class:`uuid.UUID`,
:class:`datetime.datetime` (timestamptz when it has a time zone, else timestamp),
:class:`datetime.date`, :class:`datetime.time`, ``dict`` (json), :class:`Json` (any value as
json) and lists of one of these (an array; a list of dicts is a json array). The host converts a
parameter to the type the statement needs where nothing is lost (an ``int`` to a numeric or a
bigint column, a ``str`` to a uuid). Columns come back as the same Python types (json parsed);
a timestamp outside :mod:`datetime`'s range (PostgreSQL's ``infinity``) as its microseconds
since 1970.

A failed statement raises :class:`SqlError` with ``kind`` and, when the server refused it, the
SQLSTATE ``code`` (``"23505"`` for a unique violation): catch it to decide. Left uncaught it ends
the call as a :class:`~lockgate_sdk.Retry` when trying again may succeed (the database is
unavailable; SQLSTATE classes 40, 08, 53, 57) and as a :class:`~lockgate_sdk.Reject` otherwise.
After a refused statement the transaction is aborted: later statements of the call fail with
``kind == "aborted"`` and the message cannot succeed.

Importing this module makes ``lockgate build`` build the handler against a world with the
``sql`` interface (``from lockgate_sdk import sql`` or ``import lockgate_sdk.sql``).
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import json as _json
import uuid as _uuid
from typing import Any, List, Optional, Sequence, Tuple

from componentize_py_types import Err

from .errors import HandlerError, Reject, Retry

try:
    from wit_world.imports import sql as _sql
except ImportError as _e:  # built against a world without the sql interface
    raise ImportError(
        "lockgate_sdk.sql needs a world with the sql interface: `lockgate build` picks one when a "
        "source imports the module as `from lockgate_sdk import sql` or `import lockgate_sdk.sql`"
    ) from _e

__all__ = ["Json", "Rows", "SqlError", "execute", "query"]

_EPOCH = _dt.datetime(1970, 1, 1)
_EPOCH_TZ = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_EPOCH_DATE = _dt.date(1970, 1, 1)
_I64 = (-(2**63), 2**63 - 1)


class Json:
    """A parameter sent as json whatever its Python type (a list would otherwise be an array,
    a str text)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class SqlError(HandlerError):
    """A statement failed.

    ``kind`` is ``"failed"`` (the server refused it: ``code``, ``message``, ``detail`` and
    ``constraint`` say why), ``"unavailable"``, ``"refused"`` (the host refused it: transaction
    control, several statements, no grant), ``"too_large"`` (over ``sql_max_rows`` or
    ``sql_max_result_bytes``), ``"aborted"`` (an earlier statement of the call failed) or
    ``"bad_parameter"``. Each raised error is also a :class:`~lockgate_sdk.Retry` or a
    :class:`~lockgate_sdk.Reject` (see the module docs).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        code: Optional[str] = None,
        detail: Optional[str] = None,
        constraint: Optional[str] = None,
    ) -> None:
        prefix = {
            "failed": f"SQL statement failed ({code})",
            "unavailable": "database unavailable",
            "refused": "SQL statement refused",
            "too_large": "SQL result too large",
            "aborted": "SQL transaction aborted",
            "bad_parameter": "bad SQL parameter",
        }.get(kind, "SQL error")
        reason = f"{prefix}: {message}"
        if detail:
            reason += f" ({detail})"
        super().__init__(reason)
        self.kind = kind
        #: The SQLSTATE when the server refused the statement, else None.
        self.code = code
        #: The server's message, or the host's reason.
        self.message = message
        self.detail = detail
        self.constraint = constraint

    @property
    def is_unique_violation(self) -> bool:
        """Whether the statement broke a unique constraint (SQLSTATE 23505)."""
        return self.code == "23505"

    @property
    def transient(self) -> bool:
        """Whether running the message again may succeed."""
        if self.kind == "unavailable":
            return True
        return self.code is not None and self.code[:2] in ("40", "08", "53", "57")


class _RetrySqlError(SqlError, Retry):
    pass


class _RejectSqlError(SqlError, Reject):
    pass


def _error(e: Any) -> SqlError:
    """The exception for the binding's ``sql-error``."""
    v = getattr(e, "value", None)
    names = {
        _sql.SqlError_Unavailable: "unavailable",
        _sql.SqlError_Refused: "refused",
        _sql.SqlError_TooLarge: "too_large",
        _sql.SqlError_Aborted: "aborted",
        _sql.SqlError_BadParameter: "bad_parameter",
    }
    if isinstance(e, _sql.SqlError_Failed):
        args: Tuple[Any, ...] = ("failed", v.message, v.code, v.detail, v.constraint)
    else:
        args = (names.get(type(e), "unavailable"), str(v))
    probe = SqlError(*args)
    cls = _RetrySqlError if probe.transient else _RejectSqlError
    return cls(*args)


class Rows(list):
    """The rows of a query: a list of dicts (column name to value, in column order).
    ``columns`` is the list of ``(name, type_name)`` pairs (``type_name`` is PostgreSQL's:
    ``int8``, ``text``, ...), also when there is no row."""

    columns: List[Tuple[str, str]]


def query(statement: str, params: Sequence[Any] = ()) -> Rows:
    """Runs a statement that returns rows (``SELECT``, ``... RETURNING``) and returns them.
    A column name that repeats keeps its last value in the dict; the values in order are
    ``list(row.values())`` only when names are unique, so name columns apart with ``AS``."""
    try:
        rs = _sql.query(statement, _params(params))
    except Err as e:
        raise _error(e.value) from None
    names = [c.name for c in rs.columns]
    rows = Rows(dict(zip(names, (_from_value(v) for v in r))) for r in rs.rows)
    rows.columns = [(c.name, c.type_name) for c in rs.columns]
    return rows


def execute(statement: str, params: Sequence[Any] = ()) -> int:
    """Runs a statement and returns the number of rows it affected."""
    try:
        return _sql.execute(statement, _params(params))
    except Err as e:
        raise _error(e.value) from None


def _params(params: Sequence[Any]) -> List[Any]:
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"params must be a sequence of values (a list or a tuple), got {type(params).__name__}"
        )
    out = []
    for i, p in enumerate(params, 1):
        try:
            out.append(_to_value(p))
        except (TypeError, ValueError, OverflowError) as e:
            raise _RejectSqlError("bad_parameter", f"${i}: {e}") from None
    return out


def _micros(d: _dt.timedelta) -> int:
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _scalar(p: Any) -> Tuple[str, Any]:
    """``(kind, wire value)`` of one non-null parameter; kind names the WIT case."""
    if isinstance(p, bool):
        return "boolean", p
    if isinstance(p, int):
        if _I64[0] <= p <= _I64[1]:
            return "int64", p
        return "numeric", str(p)
    if isinstance(p, float):
        return "float64", p
    if isinstance(p, str):
        return "text", p
    if isinstance(p, (bytes, bytearray, memoryview)):
        return "bytes", bytes(p)
    if isinstance(p, _decimal.Decimal):
        if not p.is_finite():
            return "numeric", str(p).lower().replace("infinity", "Infinity").replace("nan", "NaN")
        return "numeric", format(p, "f")
    if isinstance(p, _uuid.UUID):
        return "uuid", str(p)
    if isinstance(p, _dt.datetime):
        if p.tzinfo is not None and p.utcoffset() is not None:
            return "timestamptz", _micros(p - _EPOCH_TZ)
        return "timestamp", _micros(p - _EPOCH)
    if isinstance(p, _dt.date):
        return "date", (p - _EPOCH_DATE).days
    if isinstance(p, _dt.time):
        if p.tzinfo is not None:
            raise ValueError("a time with a time zone (timetz) is not supported")
        return "time", ((p.hour * 60 + p.minute) * 60 + p.second) * 1_000_000 + p.microsecond
    if isinstance(p, Json):
        return "json", _json.dumps(p.value)
    if isinstance(p, dict):
        return "json", _json.dumps(p)
    raise TypeError(f"a {type(p).__name__} cannot be a SQL parameter")


_SCALARS = {
    "boolean": _sql.Value_Boolean,
    "int64": _sql.Value_Int64,
    "float64": _sql.Value_Float64,
    "text": _sql.Value_Text,
    "bytes": _sql.Value_Bytes,
    "numeric": _sql.Value_Numeric,
    "uuid": _sql.Value_Uuid,
    "timestamptz": _sql.Value_Timestamptz,
    "timestamp": _sql.Value_Timestamp,
    "date": _sql.Value_Date,
    "time": _sql.Value_Time,
    "json": _sql.Value_Json,
}

# An array's elements share one kind; timestamps without a zone travel as timestamptz arrays
# (the WIT has no timestamp array: the host converts the same microseconds either way).
_ARRAYS = {
    "boolean": _sql.Value_BooleanArray,
    "int64": _sql.Value_Int64Array,
    "float64": _sql.Value_Float64Array,
    "text": _sql.Value_TextArray,
    "bytes": _sql.Value_BytesArray,
    "numeric": _sql.Value_NumericArray,
    "uuid": _sql.Value_UuidArray,
    "timestamptz": _sql.Value_TimestamptzArray,
    "timestamp": _sql.Value_TimestamptzArray,
    "date": _sql.Value_DateArray,
    "json": _sql.Value_JsonArray,
}


def _to_value(p: Any) -> Any:
    if p is None:
        return _sql.Value_Null()
    if isinstance(p, (list, tuple)):
        items = [None if x is None else _scalar(x) for x in p]
        kinds = {k for k, _ in filter(None, items)}
        if kinds == {"int64", "float64"}:
            # Mixed numbers: a float array (ints become floats, as in a JSON array).
            items = [None if i is None else ("float64", float(i[1])) for i in items]
            kinds = {"float64"}
        if len(kinds) > 1:
            raise TypeError(f"an array's elements must be of one kind, got {sorted(kinds)}")
        kind = next(iter(kinds), "text")
        if kind not in _ARRAYS:
            raise TypeError(f"an array of {kind} is not supported")
        return _ARRAYS[kind]([None if i is None else i[1] for i in items])
    kind, v = _scalar(p)
    return _SCALARS[kind](v)


def _from_scalar(kind: type, v: Any) -> Any:
    if kind in (_sql.Value_Json, _sql.Value_JsonArray):
        return _json.loads(v)
    if kind in (_sql.Value_Numeric, _sql.Value_NumericArray):
        return _decimal.Decimal(v)
    if kind in (_sql.Value_Uuid, _sql.Value_UuidArray):
        return _uuid.UUID(v)
    try:
        if kind in (_sql.Value_Date, _sql.Value_DateArray):
            return _EPOCH_DATE + _dt.timedelta(days=v)
        if kind is _sql.Value_Time:
            return (_EPOCH + _dt.timedelta(microseconds=v)).time()
        if kind is _sql.Value_Timestamp:
            return _EPOCH + _dt.timedelta(microseconds=v)
        if kind in (_sql.Value_Timestamptz, _sql.Value_TimestamptzArray):
            return _EPOCH_TZ + _dt.timedelta(microseconds=v)
    except OverflowError:
        return v
    return v


def _from_value(v: Any) -> Any:
    if isinstance(v, _sql.Value_Null):
        return None
    if type(v).__name__.endswith("Array"):
        return [None if x is None else _from_scalar(type(v), x) for x in v.value]
    return _from_scalar(type(v), v.value)

