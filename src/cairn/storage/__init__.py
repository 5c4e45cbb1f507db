"""Object stores (S3, GCS, OCI, Libcloud) behind one small protocol. Arrives with the object-store work."""
