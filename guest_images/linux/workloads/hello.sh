# Boot marker and a little about the machine.
echo "hello from $(uname -sr) on $(grep -c ^processor /proc/cpuinfo) cpu(s)"
grep -E '^(MemTotal|MemFree):' /proc/meminfo
grep -i 'system ram' /proc/iomem | sed 's/^/iomem: /'
