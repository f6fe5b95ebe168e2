"""The server's endpoints, one :class:`fastapi.APIRouter` per group: :mod:`.completions` (chat and
text completions), :mod:`.score`, :mod:`.models`, :mod:`.ops` (health, metrics) and :mod:`.page`
(the few-shot page). Each endpoint gets the app's :class:`~..state.ServerState` from the
:func:`~..state.get_state` dependency."""
