// Package atomicfile replaces small files so that a crash leaves either the
// old content or the new, never a mix: the data goes to a temporary file in
// the same directory, is fsynced, renamed over the target, and the directory
// is fsynced. The cluster's data-dir marker, the pgbouncer agent's applied
// generation, pgbouncer's databases file, PostgreSQL's recovery settings and
// the mail agent's files all go through it.
package atomicfile
