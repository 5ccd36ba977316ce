"""The local fleet on loopback (`make up` / `make down`) and the whole-system demo (`make demo`)."""
