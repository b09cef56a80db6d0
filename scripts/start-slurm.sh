#!/usr/bin/env bash
# Installs (when missing) and starts a one-node Slurm for tests and benchmarks: munged, slurmctld and slurmd, with
# proctrack/linuxproc and task/none (no systemd or cgroups here), and 8 GPUs of each model
# the tests name as generic resources without device files. Idempotent.
set -euo pipefail

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  echo "installing slurm-wlm and munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq slurm-wlm munge >&2
fi

host=$(hostname -s)
# the test node declares at least 8 CPUs (config_overrides) so that the scenarios, which
# mostly sleep, run side by side on a 2-core machine
cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge

cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=baygrid
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=2
InactiveLimit=0
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:h800:8 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# no real GPUs here: eight placeholder device files stand in for them, so gres scheduling
# (--gres=gpu:h800:N) is exercised for real
mkdir -p /run/baygrid-gpu
for i in 0 1 2 3 4 5 6 7; do : > /run/baygrid-gpu/gpu$i; done
cat > "$conf_dir/gres.conf" <<CONF
AutoDetect=off
NodeName=$host Name=gpu Type=h800 File=/run/baygrid-gpu/gpu[0-7]
CONF

# munge: a key, its run directory, running as the munge user
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
fi

if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure >/dev/null 2>&1 || true
else
  /usr/sbin/slurmctld
fi
for _ in $(seq 1 100); do
  if timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; then break; fi
  sleep 0.2
done
if pgrep -x slurmd >/dev/null; then
  pkill -x slurmd; sleep 1
fi
/usr/sbin/slurmd
for _ in $(seq 1 150); do
  state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) echo "slurm: node $host $state"; exit 0 ;;
    down*|drain*|inval*) timeout 5 scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
echo "slurm did not come up; see /var/log/slurm" >&2
exit 1
