import HoldfastCore
import Testing

@Suite("CgroupLocation: a process's cgroup v2 directory from mountinfo and /proc/PID/cgroup")
struct CgroupLocationTests {
    static let unified = """
        22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
        24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
        28 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
        """

    /// systemd's hybrid layout: v1 controllers, and the unified hierarchy at .../unified.
    static let hybrid = """
        25 24 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
        26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
        27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
        30 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
        """

    @Test func aUnifiedSystemsServiceCgroup() {
        let directory = CgroupLocation.directory(mountinfo: Self.unified, procCgroup: "0::/system.slice/holdfast.service\n")
        #expect(directory == "/sys/fs/cgroup/system.slice/holdfast.service")
    }

    @Test func aHybridSystemUsesTheUnifiedMountAndNotTheV1Ones() {
        let proc = "12:memory:/system.slice/holdfast.service\n1:name=systemd:/system.slice/holdfast.service\n0::/system.slice/holdfast.service\n"
        #expect(CgroupLocation.directory(mountinfo: Self.hybrid, procCgroup: proc) == "/sys/fs/cgroup/unified/system.slice/holdfast.service")
        #expect(CgroupLocation.unifiedMounts(mountinfo: Self.hybrid) == [.init(mountPoint: "/sys/fs/cgroup/unified", root: "/")])
    }

    @Test func theRootCgroupIsTheMountItself() {
        #expect(CgroupLocation.directory(mountinfo: Self.unified, procCgroup: "0::/\n") == "/sys/fs/cgroup")
    }

    @Test func aMountOfASubtreeShowsOnlyWhatIsUnderItsRoot() {
        let bound = "40 22 0:26 /kubepods/pod1 /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
        #expect(CgroupLocation.directory(mountinfo: bound, procCgroup: "0::/kubepods/pod1/c1\n") == "/sys/fs/cgroup/c1")
        #expect(CgroupLocation.directory(mountinfo: bound, procCgroup: "0::/kubepods/pod1\n") == "/sys/fs/cgroup")
        #expect(CgroupLocation.directory(mountinfo: bound, procCgroup: "0::/kubepods/pod10\n") == nil, "a sibling whose name shares the prefix")
    }

    @Test func escapedMountPointsAreDecoded() {
        let spaced = "41 22 0:26 / /mnt/cgroup\\040two rw - cgroup2 none rw\n"
        #expect(CgroupLocation.directory(mountinfo: spaced, procCgroup: "0::/a\n") == "/mnt/cgroup two/a")
    }

    @Test func noUnifiedHierarchyOrNoUnifiedLineGivesNil() {
        let v1Only = "30 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        #expect(CgroupLocation.directory(mountinfo: v1Only, procCgroup: "4:memory:/x\n0::/\n") == nil)
        #expect(CgroupLocation.directory(mountinfo: Self.unified, procCgroup: "4:memory:/x\n") == nil)
        #expect(CgroupLocation.directory(mountinfo: "garbage\n- -\n", procCgroup: "0::relative\n") == nil)
    }

    @Test func aV2ContainersOOMCountIsItsMemoryEventsAndAV1OnesItsOOMControl() {
        let v2 = CgroupLocation.oomKillCounterFiles(mountinfo: Self.unified, procCgroup: "0::/runc/box\n")
        #expect(v2 == ["/sys/fs/cgroup/runc/box/memory.events"])
        // Hybrid: runc put the container in v1 hierarchies; the unified one has no memory controller.
        let proc = "12:memory:/box\n4:cpu,cpuacct:/box\n1:name=systemd:/box\n0::/box\n"
        #expect(
            CgroupLocation.oomKillCounterFiles(mountinfo: Self.hybrid, procCgroup: proc)
                == ["/sys/fs/cgroup/unified/box/memory.events", "/sys/fs/cgroup/memory/box/memory.oom_control"])
        #expect(CgroupLocation.v1Path(procCgroup: proc, controller: "cpu") == "/box", "a co-mounted controller")
        #expect(CgroupLocation.v1Path(procCgroup: proc, controller: "cpuset") == nil)
        #expect(CgroupLocation.v1Mounts(mountinfo: Self.hybrid, controller: "memory") == [.init(mountPoint: "/sys/fs/cgroup/memory", root: "/")])
        #expect(CgroupLocation.v1Mounts(mountinfo: Self.hybrid, controller: "systemd").isEmpty, "name=systemd is not a controller")
        // A v1 mount of a subtree shows only what is under its root.
        let bound = "50 25 0:28 /pod /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        #expect(CgroupLocation.oomKillCounterFiles(mountinfo: bound, procCgroup: "4:memory:/pod/c1\n") == ["/sys/fs/cgroup/memory/c1/memory.oom_control"])
        #expect(CgroupLocation.oomKillCounterFiles(mountinfo: bound, procCgroup: "4:memory:/other\n").isEmpty)
    }

    @Test func theOOMKillCountIsReadFromEitherFile() {
        #expect(CgroupLocation.oomKills(in: "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n") == 2)
        #expect(CgroupLocation.oomKills(in: "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n") == 7)
        #expect(CgroupLocation.oomKills(in: "oom_kill_disable 0\nunder_oom 0\n") == nil, "a kernel before 4.13")
        #expect(CgroupLocation.oomKills(in: "oom_kill x\n") == nil)
    }
}
