# A perl program: an in-memory word index built, queried and rebuilt.
exec perl /workloads/wordindex.pl
