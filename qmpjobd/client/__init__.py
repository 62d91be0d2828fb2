"""`qmpjob`, the command-line client: jobs and task records at a glance, waited for, steered."""
