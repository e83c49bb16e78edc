"""crosstalk's own customer/support pair: the two agents, the room bridge between them, their conversation
(text and voice) and the start of their session in the room."""
