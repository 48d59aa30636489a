"""The VM manager: lifecycle state machine, state store and provisioning."""
