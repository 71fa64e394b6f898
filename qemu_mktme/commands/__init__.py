"""The commands of ``qemu-mktme``: one module per top-level noun, each with ``register(subparsers)``.

A command module is the only place that sees an argparse namespace: it turns the options into
typed library calls and prints their results. Its actions set ``func(args)``, returning an exit
status or a coroutine that the CLI runs (``cli.run_async``); a command line that cannot work is
:class:`.options.UsageError` (exit 2). ``cli`` holds the table of these modules and the exit policy.

    options    argument types, option groups shared by commands, UsageError, JSON output
    run        run: boot guests in the foreground (local keys, or an attested launch)
    attach     attach: bind a QEMU someone else started
    query      query: a running host's encryption state
    host       host start: an emulated host that takes incoming migrations
    migrate    migrate: live-migrate a VM between two running hosts
    dump       dump: a running host's DRAM image
    snapshot   snapshot save|restore|verify
    nvdimm     nvdimm show|rekey: NVDIMM media images offline
    demo       demo
    attack     attack replay|badram|batteringram|wiretap|cipherleak|matrix
    verify     verify: plain vs emulated runs
    inspect    inspect DUMP map|entropy|search|decrypt|diff
    images     images build|list: guest images
    doctor     doctor
    keyserver  keyserver start|stop|status
    tenant     tenant init|add-key|policy|show
    image      image encrypt|verify: disk images encrypted at rest
"""
