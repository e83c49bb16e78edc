"""crosstalk's customer against the user's own agent (the target), as LiveKit's simulator: the call, its
conversation (text and voice), the target's dispatch, link and replies."""
