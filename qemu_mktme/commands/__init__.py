"""The commands of ``qemu-mktme``: one module per top-level noun, each with ``register(subparsers)``.

A command module is the only place that sees an argparse namespace: it turns the options into
typed library calls and prints their results. Its actions set ``func(args)``, returning an exit
status or a coroutine that the CLI runs (``cli.run_async``); a command line that cannot work is
:class:`.options.UsageError` (exit 2). ``cli`` holds the table of these modules and the exit policy.

    options    argument types, option groups shared by commands, UsageError, Unlisted, JSON output
    run        run: boot guests in the foreground (local keys, or an attested launch)
    attach     attach: bind a QEMU someone else started
    host       host start|migrate|query|dump: the verbs of a running host; start is here,
    migrate      host migrate: live-migrate a VM between two running hosts
    query        host query: a running host's encryption state
    dump         host dump: a running host's DRAM image
    snapshot   snapshot save|restore|verify
    nvdimm     nvdimm show|rekey: NVDIMM media images offline
    inspect    inspect DUMP map|entropy|search|decrypt|diff
    attack     attack replay|badram|batteringram|wiretap|cipherleak|matrix
    demo       demo
    compare    compare: plain vs emulated runs
    images     images build|list: guest images (and the shim, QEMU 10) in the cache
    disk       disk encrypt|verify: the tenant's disk images, encrypted at rest
    doctor     doctor
    keyserver  keyserver start|stop|status
    tenant     tenant init|add-key|policy|show
    libvirt    libvirt domain-xml|hook|start

Old names kept working, unlisted (``cli.ALIASES``, registered through :class:`.options.Unlisted`):
``migrate``, ``query``, ``dump`` (now under ``host``), ``verify`` (``compare``), ``image`` (``disk``).
A renamed command keeps its old name there, so that no script breaks.
"""
