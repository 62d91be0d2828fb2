"""Task records: a lasting record of every job and of clients' own work, and their change feed."""
