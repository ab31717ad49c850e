"""Remote attestation: verification of TEE quotes."""
