"""The guest agent (guest.py, stdlib only), its framing (protocol.py) and the host client."""
